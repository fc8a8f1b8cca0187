"""Step caching speed-ups through the worker at full size, and float8 error on a small quantizable model.

1. handler.handler() video jobs at 480x832, 33 frames, --steps steps, with "step_cache" off,
   first_block at several thresholds, and taylorseer: inference seconds and the speed-up against
   "off" in the same run (random weights say nothing about quality: only speed is measured).
2. The worker's float8 switch (model_handler._quantize_fp8) on a small Wan transformer whose
   widths torchao can quantize (multiples of 16; the test suite's tiny model has 24-wide layers,
   which torchao leaves in bf16): relative error of one forward against bf16.

    python benchmarks/step_cache.py [--workdir /tmp/bench-models] [--out DIR] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench import build_group, group_ready, input_image, png_data_uri, script_record, worker_env  # noqa: E402

RESULTS, log = script_record("cache")
RESULTS["jobs"] = {}


def small_fp8() -> dict:
    from diffusers import WanTransformer3DModel

    from model_handler import _quantize_fp8

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=36, out_channels=16,
            text_dim=64, freq_dim=256, ffn_dim=256, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=64, added_kv_proj_dim=128,
            rope_max_seq_len=1024).to(torch.bfloat16).eval()
    x = torch.randn(1, 36, 5, 30, 52, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 512, 64, device="cuda", dtype=torch.bfloat16)
    img = torch.randn(1, 257, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500], device="cuda")
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                    return_dict=False)[0].float()
        _quantize_fp8(model)
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, encoder_hidden_states_image=img,
                    return_dict=False)[0].float()
    quantized = sum(1 for m in model.modules() if "Float8" in type(getattr(m, "weight", None)).__name__)
    return {"rel_err": ((out - ref).norm() / ref.norm()).item(), "quantized_linears": quantized,
            "config": "4 layers, 4 heads x 32, ffn 256, 1950 tokens"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "cache-out")))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--only", help="comma-separated variant names to run after the warm-up, e.g. off,taylorseer")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        RESULTS["small_fp8"] = small_fp8() if not args.only else {"skipped": "--only"}
        log(f"small model fp8 vs bf16: {RESULTS['small_fp8']}")
    except Exception as err:  # noqa: BLE001 - keep what was measured
        RESULTS["small_fp8"] = {"error": repr(err)[:300]}
    if not group_ready(args.workdir, "wan", "full"):
        build_group("wan", args.workdir, "full", "cuda", log)

    import handler
    from settings import load_settings

    handler.configure(load_settings(worker_env(args.workdir)))
    base = {"mode": "video", "image_url": png_data_uri(input_image(832, 480)), "prompt": "a boat on a lake",
            "num_frames": 33, "num_inference_steps": args.steps, "seed": 1}
    variants = [("warm-up (off)", {"num_inference_steps": 2}), ("off", {}),
                ("first_block 0.05", {"step_cache": "first_block", "step_cache_threshold": 0.05}),
                ("first_block 0.1", {"step_cache": "first_block", "step_cache_threshold": 0.1}),
                ("first_block 0.2", {"step_cache": "first_block", "step_cache_threshold": 0.2}),
                ("taylorseer", {"step_cache": "taylorseer"})]
    if args.only:
        variants = [v for v in variants if v[0].startswith("warm-up") or v[0] in args.only.split(",")]
    for name, extra in variants:
        start = time.perf_counter()
        result = handler.handler({"id": name.replace(" ", "-"), "input": {**base, **extra}})
        rec = {"wall_s": time.perf_counter() - start}
        rec.update(result.get("timings", {}) if "error" not in result else {"error": result["error"]})
        RESULTS["jobs"][name] = rec
        log(f"{name}: {rec}")
        (args.out / "step_cache.json").write_text(json.dumps(RESULTS, indent=1))
    off = RESULTS["jobs"]["off"].get("inference_s")
    print(f"| step_cache (480x832, 33 frames, {args.steps} steps, CFG) | inference s | speed-up vs off |")
    print("|---|---|---|")
    for name, rec in RESULTS["jobs"].items():
        if name.startswith("warm-up"):
            continue
        if "error" in rec:
            print(f"| {name} | error: {rec['error'][:80]} | |")
        else:
            print(f"| {name} | {rec['inference_s']:.2f} | {off / rec['inference_s']:.2f}x |")
    print(f"\nsmall-model fp8: {RESULTS['small_fp8']}")


if __name__ == "__main__":
    main()
