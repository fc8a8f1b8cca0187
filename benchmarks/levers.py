"""Speed levers measured on the full-size architectures (random weights), one H100 command.

For one Wan2.1-I2V-14B transformer forward at 480x832, 81 frames (32,760 tokens): eager bf16 with
PyTorch SDPA (the reference), cuDNN attention, regional compile, and the worker's own float8
quantization (model_handler._quantize_fp8) eager and compiled, each with its relative error
against the bf16 eager output. Then the same float8 switch on the tiny model through the worker
(output error against bf16), Wan's VAE in float32 against bfloat16 (time and error), and SDXL UNet
steps per second at 1024x1024 with CFG: eager, regional compile and whole-UNet compile. Prints a
markdown table; writes OUT/levers.json.

    python benchmarks/levers.py [--out DIR] [--budget-s 540]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import CONFIGS, build_component, script_record  # noqa: E402

START = time.perf_counter()
RESULTS, log = script_record("levers")


def timed(fn, n: int = 3, warm: int = 1) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def uncompile(model: torch.nn.Module) -> None:
    for block in model.modules():
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
    torch._dynamo.reset()


def wan_forward(out: Path, budget_s: float) -> None:
    from model_handler import _quantize_fp8

    res = RESULTS.setdefault("wan_forward", {})
    tr = build_component("wan_transformer", CONFIGS["full"]["wan_transformer"], torch.bfloat16, "cuda", seed=0)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 36, 21, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    img = torch.randn(1, 257, 1280, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500], device="cuda")

    def fwd():
        with torch.no_grad():
            return tr(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                      return_dict=False)[0]

    ref = fwd().clone()
    res["bf16_eager_native_s"] = timed(fwd)
    log(f"bf16 eager native {res['bf16_eager_native_s']:.3f}s")
    dump(out)
    for backend in ("_native_cudnn", "_native_flash"):
        try:
            tr.set_attention_backend(backend)
            res[f"bf16_eager_{backend}_s"] = timed(fwd)
            log(f"bf16 eager {backend} {res[f'bf16_eager_{backend}_s']:.3f}s")
        except Exception as err:  # noqa: BLE001 - report what does not run
            res[f"bf16_eager_{backend}_error"] = repr(err)[:300]
        tr.set_attention_backend("native")
    dump(out)
    start = time.perf_counter()
    tr.compile_repeated_blocks(fullgraph=True)
    o = fwd()
    torch.cuda.synchronize()
    res["bf16_compile_first_call_s"] = time.perf_counter() - start
    res["bf16_compiled_rel_err"] = rel(o, ref)
    res["bf16_compiled_s"] = timed(fwd)
    log(f"bf16 compiled {res['bf16_compiled_s']:.3f}s (first call {res['bf16_compile_first_call_s']:.0f}s)")
    dump(out)
    uncompile(tr)
    start = time.perf_counter()
    _quantize_fp8(tr)
    res["fp8_quantize_s"] = time.perf_counter() - start
    res["fp8_weights_GiB"] = torch.cuda.memory_allocated() / 2**30
    o = fwd()
    res["fp8_eager_rel_err"] = rel(o, ref)
    res["fp8_eager_s"] = timed(fwd)
    log(f"fp8 eager {res['fp8_eager_s']:.3f}s, rel err {res['fp8_eager_rel_err']:.4f}")
    dump(out)
    if time.perf_counter() - START > budget_s - 260:
        res["fp8_compiled_skipped"] = "not enough time left in this command"
        return
    start = time.perf_counter()
    tr.compile_repeated_blocks(fullgraph=True)
    o = fwd()
    torch.cuda.synchronize()
    res["fp8_compile_first_call_s"] = time.perf_counter() - start
    res["fp8_compiled_rel_err"] = rel(o, ref)
    res["fp8_compiled_s"] = timed(fwd)
    log(f"fp8 compiled {res['fp8_compiled_s']:.3f}s (first call {res['fp8_compile_first_call_s']:.0f}s)")
    torch._dynamo.reset()
    dump(out)


def tiny_fp8(out: Path) -> None:
    """The worker's WAN_FP8 switch on the tiny model: frames against the same job in bf16."""
    import tempfile

    import numpy as np
    from PIL import Image

    import download_weights
    from model_handler import ModelHandler
    from schemas import VIDEO_FIELDS
    from settings import load_settings

    res = RESULTS.setdefault("tiny_fp8", {})
    with tempfile.TemporaryDirectory() as tmp:
        download_weights.build_tiny_wan(Path(tmp))
        p = {name: param.default for name, param in VIDEO_FIELDS.items()}
        p.update(prompt="a boat", seed=1, height=64, width=64, num_frames=9, num_inference_steps=4)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        frames = {}
        for fp8 in (False, True):
            try:
                models = ModelHandler(load_settings({"WAN_MODEL_ID": f"{tmp}/wan-i2v", "WAN_FP8": str(int(fp8))}))
                frames[fp8] = models.generate_video(p, image, lambda *_: None)[0]
            except Exception as err:  # noqa: BLE001
                res[f"fp8_{fp8}_error"] = repr(err)[:300]
        if len(frames) == 2:
            a, b = (torch.from_numpy(frames[k]) for k in (True, False))
            res["frames_rel_err_fp8_vs_bf16"] = rel(a, b)
            log(f"tiny model fp8 vs bf16 frames rel err {res['frames_rel_err_fp8_vs_bf16']:.4f}")
    dump(out)


def fp8_compile_cost(out: Path, layers: int = 4) -> None:
    """Where the float8 + regional-compile warm-up time goes: each call's seconds and the graphs
    dynamo compiled, on a full-width Wan transformer cut to a few blocks (the blocks are identical,
    so one compiled block serves all unless something forces a recompile per block or per call)."""
    import torch._dynamo.utils as dynamo_utils

    from model_handler import _quantize_fp8

    res = RESULTS.setdefault("fp8_compile_cost", {"layers": layers})
    cfg = dict(CONFIGS["full"]["wan_transformer"], num_layers=layers)
    tr = build_component("wan_transformer", cfg, torch.bfloat16, "cuda", seed=0)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 36, 21, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
    contexts = [torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2)]
    img = torch.randn(1, 257, 1280, device="cuda", dtype=torch.bfloat16, generator=g)
    _quantize_fp8(tr)
    tr.compile_repeated_blocks(fullgraph=True)
    dynamo_utils.counters.clear()
    calls = []
    # As the pipeline calls it: cond then uncond (other text embeddings) at two timesteps.
    for step, t in enumerate((999, 970)):
        for ctx in contexts:
            start = time.perf_counter()
            with torch.no_grad():
                tr(hidden_states=x, timestep=torch.tensor([t], device="cuda"), encoder_hidden_states=ctx,
                   encoder_hidden_states_image=img, return_dict=False)
            torch.cuda.synchronize()
            calls.append({"step": step, "s": time.perf_counter() - start,
                          "graphs_so_far": dynamo_utils.counters["stats"]["unique_graphs"]})
            log(f"fp8 compiled call: {calls[-1]}")
    res["calls"] = calls
    res["recompiles"] = {k: dict(v) for k, v in dynamo_utils.counters.items() if k in ("recompiles", "stats")}
    dump(out)


def wan_vae(out: Path) -> None:
    """Wan's VAE at 480x832 x 81 frames: float32 (the model card) against bfloat16 (WAN_VAE_DTYPE)."""
    res = RESULTS.setdefault("wan_vae", {})
    vae = build_component("wan_vae", CONFIGS["full"]["wan_vae"], torch.float32, "cuda", seed=3)
    g = torch.Generator("cuda").manual_seed(0)
    # I2V encodes the input image followed by 80 blank frames; random pixels here, so nothing is trivially zero.
    video = torch.rand(1, 3, 81, 480, 832, device="cuda", generator=g) * 2 - 1
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        vae.to(dtype)
        name = str(dtype).replace("torch.", "")
        with torch.no_grad():
            enc = functools.partial(lambda x: vae.encode(x).latent_dist.mode(), video.to(dtype))
            dec = functools.partial(lambda z: vae.decode(z, return_dict=False)[0], latents.to(dtype))
            res[f"{name}_encode_s"] = timed(enc, n=2)
            res[f"{name}_decode_s"] = timed(dec, n=2)
            outs[name] = (enc().float(), dec().float())
        log(f"Wan VAE {name}: encode {res[f'{name}_encode_s']:.2f}s, decode {res[f'{name}_decode_s']:.2f}s")
    res["bf16_encode_rel_err"] = rel(outs["bfloat16"][0], outs["float32"][0])
    res["bf16_decode_rel_err"] = rel(outs["bfloat16"][1], outs["float32"][1])
    log(f"Wan VAE bf16 vs fp32 rel err: encode {res['bf16_encode_rel_err']:.4f}, "
        f"decode {res['bf16_decode_rel_err']:.4f}")
    dump(out)


def sdxl_unet(out: Path, budget_s: float, stages: tuple[str, ...] = ()) -> None:
    res = RESULTS.setdefault("sdxl_unet", {})
    unet = build_component("sdxl_unet", CONFIGS["full"]["sdxl_unet"], torch.float16, "cuda", seed=1)
    lat = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
    enc = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
    added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
             "time_ids": torch.randn(2, 6, device="cuda", dtype=torch.float16)}
    tt = torch.tensor([500, 500], device="cuda")

    def step():
        with torch.no_grad():
            unet(lat, tt, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)

    res["eager_it_s"] = 1 / timed(step, n=10, warm=3)
    log(f"SDXL eager {res['eager_it_s']:.2f} it/s")
    if "compile" in stages:
        start = time.perf_counter()
        unet.compile_repeated_blocks(fullgraph=True)
        step()
        torch.cuda.synchronize()
        res["regional_compile_first_call_s"] = time.perf_counter() - start
        res["regional_compiled_it_s"] = 1 / timed(step, n=10, warm=3)
        log(f"SDXL regional compile {res['regional_compiled_it_s']:.2f} it/s")
        uncompile(unet)
    dump(out)
    unet.set_attention_backend("_native_cudnn")
    res["cudnn_attention_it_s"] = 1 / timed(step, n=10, warm=3)
    log(f"SDXL cuDNN attention {res['cudnn_attention_it_s']:.2f} it/s")
    unet.set_attention_backend("native")
    unet.fuse_qkv_projections()
    res["fused_qkv_it_s"] = 1 / timed(step, n=10, warm=3)
    log(f"SDXL fused QKV {res['fused_qkv_it_s']:.2f} it/s")
    unet.unfuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    res["channels_last_it_s"] = 1 / timed(step, n=10, warm=3)
    log(f"SDXL channels_last {res['channels_last_it_s']:.2f} it/s")
    unet.to(memory_format=torch.contiguous_format)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "transformer_blocks" in fqn)
    res["fp8_linears_it_s"] = 1 / timed(step, n=10, warm=3)
    log(f"SDXL fp8 transformer-block linears {res['fp8_linears_it_s']:.2f} it/s")
    dump(out)


def dump(out: Path) -> None:
    (out / "levers.json").write_text(json.dumps(RESULTS, indent=1))


def table() -> str:
    w, s = RESULTS.get("wan_forward", {}), RESULTS.get("sdxl_unet", {})
    ref = w.get("bf16_eager_native_s")
    rows = ["| lever | one Wan forward s | vs bf16 eager | rel. error vs bf16 |", "|---|---|---|---|"]
    for label, key, err in [("bf16 eager, SDPA (reference)", "bf16_eager_native_s", None),
                            ("bf16 eager, cuDNN attention", "bf16_eager__native_cudnn_s", None),
                            ("bf16 eager, SDPA flash only", "bf16_eager__native_flash_s", None),
                            ("bf16 regional compile", "bf16_compiled_s", "bf16_compiled_rel_err"),
                            ("fp8 (torchao) eager", "fp8_eager_s", "fp8_eager_rel_err"),
                            ("fp8 (torchao) regional compile", "fp8_compiled_s", "fp8_compiled_rel_err")]:
        if key in w and ref:
            e = f"{w[err]:.4f}" if err and err in w else ""
            rows.append(f"| {label} | {w[key]:.3f} | {ref / w[key]:.2f}x | {e} |")
    v = RESULTS.get("wan_vae", {})
    if "float32_decode_s" in v:
        rows += ["", "| Wan VAE, 480x832 x 81 frames | encode s | decode s | rel. error vs float32 (enc / dec) |",
                 "|---|---|---|---|"]
        for name in ("float32", "bfloat16"):
            err = (f"{v['bf16_encode_rel_err']:.4f} / {v['bf16_decode_rel_err']:.4f}"
                   if name == "bfloat16" and "bf16_decode_rel_err" in v else "")
            rows.append(f"| {name} | {v.get(name + '_encode_s', float('nan')):.2f} | "
                        f"{v.get(name + '_decode_s', float('nan')):.2f} | {err} |")
    rows += ["", "| SDXL UNet 1024x1024, CFG batch 2, fp16 | it/s |", "|---|---|"]
    for label, key in [("eager", "eager_it_s"), ("regional compile", "regional_compiled_it_s"),
                       ("cuDNN attention", "cudnn_attention_it_s"), ("fused QKV projections", "fused_qkv_it_s"),
                       ("channels_last", "channels_last_it_s"),
                       ("fp8 (torchao) transformer-block linears", "fp8_linears_it_s")]:
        if key in s:
            rows.append(f"| {label} | {s[key]:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "levers-out")))
    parser.add_argument("--budget-s", type=float, default=540)
    parser.add_argument("--only", default="wan,tiny,sdxl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.only.split(",")
    for name, fn in (("wan", lambda: wan_forward(args.out, args.budget_s)), ("tiny", lambda: tiny_fp8(args.out)),
                     ("vae", lambda: wan_vae(args.out)), ("fp8compile", lambda: fp8_compile_cost(args.out)),
                     ("sdxl", lambda: sdxl_unet(args.out, args.budget_s, tuple(stages)))):
        if name in stages:
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - keep what was measured
                RESULTS[f"{name}_error"] = repr(err)[:500]
                log(f"{name} failed: {err!r}"[:500])
            torch.cuda.empty_cache()
    dump(args.out)
    print(table())


if __name__ == "__main__":
    main()
