#!/usr/bin/env python3
"""Which lever lets a second worker start the compiled float8 Wan block without tracing it again?

One full-size Wan2.1-I2V-14B WanTransformerBlock (480x832x81: 32760 video tokens, 257 image + 512 text
context tokens; random weights, bf16, inputs captured from a one-layer WanTransformer3DModel's forward) is
compiled as the worker compiles it (fullgraph, dynamic, no duck shapes) for each variant:

    bf16       plain
    torchao    torchao Float8DynamicActivationFloat8WeightConfig(PerRow()) on the block's nn.Linear layers
    scaled_mm  each nn.Linear -> Fp8Linear: plain float8 tensors + per-row scales, torch._scaled_mm
    X+precompile  torch._dynamo.config.caching_precompile: the artifacts also hold dynamo's traced bytecode
    X+aoti     torch.export (dynamic sequence) + AOTInductor package instead of torch.compile

Each variant runs in a fresh process ("cold": compile, first call, save_cache_artifacts() to a file), then
in another fresh process with new, empty inductor and triton cache dirs that loads that file first
("cached"). Both report the first call's seconds, the dynamo/AOTAutograd/inductor cache counters, the
steady forward (median of 5) and the error against the bf16 eager block on the same input.

    python3 benchmarks/fp8_compile.py --out /tmp/fp8c/fp8-compile.json \
        --lanes 'torchao;torchao+precompile;bf16,scaled_mm,scaled_mm+precompile,scaled_mm+aoti'

Lanes (';') run side by side, the variants of a lane (',') one after another; steady timings take a file
lock so they never overlap. CPU smoke test: --tiny --device cpu --lanes bf16,bf16+precompile,bf16+aoti
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

FP8_MAX = 448.0  # largest float8_e4m3fn value
FULL = dict(heads=40, ffn=13824, frames=21, height=60, width=104, text=512, image=257, text_dim=4096, image_dim=1280)
TINY = dict(heads=2, ffn=512, frames=2, height=8, width=8, text=16, image=257, text_dim=64, image_dim=32)


class Fp8Linear(nn.Module):  # at module scope: caching_precompile pickles guards that name its class
    """nn.Linear as plain tensors: float8 e4m3 weight (out, in) with a per-output-row float32 scale, and
    per-row dynamic float8 activations; torch._scaled_mm does the matmul (no tensor subclass to trace)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # (out, 1)
        self.register_buffer("weight", (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (M, 1)
        x_fp8 = (x2.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                             bias=self.bias, out_dtype=torch.bfloat16)
        return y.reshape(*x.shape[:-1], self.out_features)


def build_block(tiny: bool, device: str):
    """A one-layer WanTransformer3DModel with the real dims; returns its block and the args the model passes it."""
    from diffusers import WanTransformer3DModel

    d = TINY if tiny else FULL
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(num_layers=1, num_attention_heads=d["heads"], ffn_dim=d["ffn"], in_channels=36,
                                      out_channels=16, text_dim=d["text_dim"], image_dim=d["image_dim"],
                                      added_kv_proj_dim=d["heads"] * 128)
    keep = model._keep_in_fp32_modules  # as from_pretrained(dtype=bfloat16) leaves them
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not any(k in name.split(".") for k in keep):
            t.data = t.data.to(torch.bfloat16)
    model.requires_grad_(False)
    g = torch.Generator(device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)  # noqa: E731
    latents = rand(1, 36, d["frames"], 2 * d["height"], 2 * d["width"])
    captured = {}

    def grab(module, args):
        captured["args"] = args
        raise StopIteration

    hook = model.blocks[0].register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(latents, torch.tensor([500.0], device=device), rand(1, d["text"], d["text_dim"]),
                  encoder_hidden_states_image=rand(1, d["image"], d["image_dim"]))
    except StopIteration:
        pass
    hook.remove()
    return model.blocks[0], captured["args"]


def apply_lever(block, base: str) -> None:
    if base == "torchao":  # the worker's quantization before models/float8.py
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        quantize_(block, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    elif base == "scaled_mm":  # same arithmetic with plain tensors
        for module in list(block.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, Fp8Linear(child))


def worker(a) -> dict:
    start = time.perf_counter()
    import torch._dynamo.utils as dutils

    base, _, extra = a.worker.partition("+")
    torch.fx.experimental._config.use_duck_shape = False  # as the worker does
    if extra == "precompile":  # dynamo's bytecode + guards go into the artifacts (DynamoCache) and come back
        torch._dynamo.config.caching_precompile = True
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    res = dict(variant=a.worker, phase=a.phase, torch=torch.__version__,
               gpu=torch.cuda.get_device_name() if a.device == "cuda" else "cpu")
    try:
        import torchao
        res["torchao"] = torchao.__version__
    except ImportError:
        pass
    block, args = build_block(a.tiny, a.device)
    res["shapes"] = [list(t.shape) if isinstance(t, torch.Tensor) else [list(x.shape) for x in t] for t in args]
    art = Path(a.artifacts)
    with torch.no_grad():
        ref = block(*args)  # bf16 eager reference
        apply_lever(block, base)
        res["setup_s"] = time.perf_counter() - start
        t_start = time.perf_counter()  # start_s: artifacts load + compile (or export/package load) + first call
        if extra == "aoti":  # cold: export + AOTInductor compile; cached: load the package only
            t = time.perf_counter()
            if a.phase == "cold":
                seq = torch.export.Dim("seq", min=16, max=131072)
                dims = ({1: seq}, None, None, ({1: seq}, {1: seq}))  # video tokens vary; context and temb don't
                ep = torch.export.export(block, tuple(args), dynamic_shapes=dims)
                res["export_s"] = time.perf_counter() - t
                torch._inductor.aoti_compile_and_package(ep, package_path=str(art))
            fn = torch._inductor.aoti_load_package(str(art))
            res["load_s"] = time.perf_counter() - t
            t = time.perf_counter()
        else:
            if a.phase == "cached":
                t = time.perf_counter()
                res["load_artifacts"] = repr(torch.compiler.load_cache_artifacts(art.read_bytes()))[:2000]
                res["load_s"] = time.perf_counter() - t
            t = time.perf_counter()  # with caching_precompile, torch.compile() itself loads the DynamoCache entry
            fn = torch.compile(block, fullgraph=True, dynamic=True)
            res["wrap_s"] = time.perf_counter() - t
        out = fn(*args)
        sync()
        res["first_call_s"] = time.perf_counter() - t  # torch.compile() + first call (aoti: first call)
        res["start_s"] = time.perf_counter() - t_start
        if a.phase == "cold" and extra != "aoti":
            saved = torch.compiler.save_cache_artifacts()
            art.write_bytes(saved[0])
            res["artifacts_mb"] = len(saved[0]) / 1e6
            res["cache_info"] = repr(saved[1])[:2000]
        with open(a.lock, "w") as lock:  # steady timing never overlaps another lane's
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
            for _ in range(2):
                fn(*args)
            times = []
            for _ in range(5):
                sync()
                t = time.perf_counter()
                out = fn(*args)
                sync()
                times.append(time.perf_counter() - t)
        res["steady_ms"] = 1e3 * statistics.median(times)
        res["rel_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    res["counters"] = {k: dict(v) for k, v in dutils.counters.items() if v}
    try:
        headers, values = dutils.compile_times(repr="csv", aggregate=True)
        res["compile_times"] = dict(zip(headers, values, strict=False))
    except Exception as err:  # noqa: BLE001 - diagnostics only
        res["compile_times"] = repr(err)
    res["process_s"] = time.perf_counter() - start
    return res


def run_lane(variants: list[str], a, results: dict, mutex: threading.Lock) -> None:
    for variant in variants:
        for phase in ("cold", "cached"):
            tag = f"{variant}-{phase}".replace("+", "_")
            with tempfile.TemporaryDirectory(prefix=f"{tag}-", dir=a.work) as cache:  # empty local caches
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
                           TRITON_CACHE_DIR=f"{cache}/triton", PYTHONUNBUFFERED="1")
                out, work = Path(a.work) / f"{tag}.json", Path(a.work)
                artifacts = work / (variant.replace("+", "_") + (".pt2" if "aoti" in variant else ".bin"))
                cmd = [sys.executable, __file__, "--worker", variant, "--phase", phase, "--device", a.device,
                       "--artifacts", str(artifacts), "--lock", str(work / "steady.lock"), "--result", str(out)]
                cmd += ["--tiny"] if a.tiny else []
                t = time.perf_counter()
                with open(Path(a.work) / f"{tag}.log", "w") as log:
                    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                res = json.loads(out.read_text()) if rc == 0 and out.exists() else {
                    "error": f"rc {rc}", "log_tail": (Path(a.work) / f"{tag}.log").read_text()[-3000:]}
                res["wall_s"] = time.perf_counter() - t
            with mutex:
                results["variants"].setdefault(variant, {})[phase] = res
                Path(a.out).write_text(json.dumps(results, indent=1))
            print(f"{tag}: {res.get('first_call_s', res.get('error'))}", flush=True)
            if "error" in res:
                break


def table(results: dict) -> str:
    rows = ["variant | cold start s | cached start s | cached first call s | load s | aot hit/miss/bypass"
            " | fxgraph hit/miss | dynamo_cache hit | steady ms | rel err", "--- | " * 9 + "---"]
    for variant, r in results["variants"].items():
        cold, cached = r["cold"], r.get("cached", {})
        c = cached.get("counters", {})
        aot, ind, dyn = c.get("aot_autograd", {}), c.get("inductor", {}), c.get("dynamo_cache", {})
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        rows.append(" | ".join([variant, f(cold.get("start_s")), f(cached.get("start_s")),
                                f(cached.get("first_call_s")), f(cached.get("load_s"), 2),
                                "/".join(str(aot.get(f"autograd_cache_{k}", 0)) for k in ("hit", "miss", "bypass")),
                                f"{ind.get('fxgraph_cache_hit', 0)}/{ind.get('fxgraph_cache_miss', 0)}",
                                str(dyn.get("dynamo_cache_hit", 0)), f(cached.get("steady_ms", cold.get("steady_ms"))),
                                f(cached.get("rel_err", cold.get("rel_err")), 4)]))
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lanes", default="bf16,torchao,scaled_mm,scaled_mm+precompile")
    p.add_argument("--out", default="benchmarks/results/fp8-compile.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small dims, for a smoke test")
    p.add_argument("--worker"), p.add_argument("--phase"), p.add_argument("--artifacts"), p.add_argument("--lock")
    p.add_argument("--result")
    a = p.parse_args()
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a), indent=1))
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    a.work = tempfile.mkdtemp(prefix="fp8c-")
    results: dict = {"lanes": a.lanes, "tiny": a.tiny, "work": a.work, "variants": {}}
    mutex = threading.Lock()
    lanes = [threading.Thread(target=run_lane, args=(lane.split(","), a, results, mutex))
             for lane in a.lanes.split(";")]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    runs = [run for r in results["variants"].values() for run in r.values()]
    first = next((run for run in runs if "torch" in run), {})
    results.update({k: first.get(k) for k in ("gpu", "torch", "torchao")}, table=table(results))
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"{results['gpu']}, torch {results['torch']}, torchao {results['torchao']}\n{results['table']}")


if __name__ == "__main__":
    main()
