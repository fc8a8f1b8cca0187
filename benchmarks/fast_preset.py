"""The fast video preset and the cost of a LoRA, through the worker, at full size (random weights).

Builds the full-size Wan2.1-I2V-14B folders (bench.build_group) if missing, writes a random
rank-64 LoRA on every linear of the 40 blocks (lightx2v's distill LoRAs are rank 64 on the same
layers), and runs handler.handler() at 480x832, 81 frames:
  1. "preset": "fast" (4 steps, guidance 1.0: one transformer call per step), LoRA unfused;
  2. the same with LORA_FUSE=1 (merged weights);
  3. the default quality job (CFG) for --steps steps without and with the LoRA, for the LoRA's cost per step.
Optional --set KEY=VALUE settings (e.g. WAN_FP8=1 WAN_COMPILE=1) apply to every job.

    python benchmarks/fast_preset.py [--workdir /tmp/bench-models] [--out DIR] [--steps 3] [--set K=V]
"""

from __future__ import annotations

import argparse
import dataclasses
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

RESULTS, log = script_record("fast")
RESULTS["jobs"] = {}


def write_lora(path: Path, rank: int = 64) -> int:
    """A PEFT-format LoRA for every block linear of the full-size transformer, B non-zero."""
    from bench import CONFIGS, build_component
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {}
        model = build_component("wan_transformer", CONFIGS["full"]["wan_transformer"], torch.bfloat16, "meta", 0)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
                shapes[name] = (module.in_features, module.out_features)
    g = torch.Generator("cuda").manual_seed(0)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, fan_in, device="cuda", generator=g)
                                                        * fan_in**-0.5).to(torch.bfloat16).cpu()
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(fan_out, rank, device="cuda", generator=g)
                                                        * 1e-3).to(torch.bfloat16).cpu()
    save_file(tensors, str(path))
    return path.stat().st_size


def run_job(name: str, job_input: dict) -> dict:
    import handler

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    calls: list[float] = []
    models = handler._state()[1]
    hook = None
    if models.wan is not None:
        hook = models.wan.transformer.register_forward_pre_hook(lambda *a: calls.append(time.perf_counter()))
    start = time.perf_counter()
    result = handler.handler({"id": name, "input": job_input})
    wall = time.perf_counter() - start
    if hook is not None:
        hook.remove()
    if "error" in result:
        raise RuntimeError(f"{name}: {result['error']}")
    rec = {"wall_s": wall, "timings": result["timings"], "transformer_calls": len(calls),
           "peak_alloc_GiB": torch.cuda.max_memory_allocated() / 2**30}
    RESULTS["jobs"][name] = rec
    log(f"{name}: {wall:.2f}s wall, {len(calls)} transformer calls, timings {result['timings']}")
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "fast-out")))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--jobs", help="comma-separated subset of the jobs to run, in order")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not group_ready(args.workdir, "wan", "full"):
        build_group("wan", args.workdir, "full", "cuda", log)
    lora = args.workdir / "loras" / "distill-like-rank64.safetensors"
    lora.parent.mkdir(exist_ok=True)
    if not lora.exists():
        RESULTS["lora_bytes"] = write_lora(lora)
        log(f"LoRA written: {RESULTS['lora_bytes'] / 1e6:.0f} MB")

    import handler
    from settings import load_settings

    overrides = dict(item.split("=", 1) for item in args.set)
    env = worker_env(args.workdir, {"MODEL_DIR": str(args.workdir), "WAN_FAST_LORA": str(lora), **overrides})
    settings = load_settings(env)
    handler.configure(settings)
    RESULTS["settings"] = overrides
    image = png_data_uri(input_image(832, 480))
    base = {"mode": "video", "image_url": image, "prompt": "a boat on a lake", "num_frames": 81, "seed": 1}
    jobs = [
        ("fast_unfused", dict(base, preset="fast"), settings),
        ("fast_fused", dict(base, preset="fast"), dataclasses.replace(settings, lora_fuse=True)),
        ("quality_no_lora", dict(base, num_inference_steps=args.steps), settings),
        ("quality_lora", dict(base, num_inference_steps=args.steps,
                              loras=[{"path": str(lora), "scale": 1.0}]), settings),
        ("fast_again_unfused", dict(base, preset="fast"), settings),
        ("fast_fused_again", dict(base, preset="fast"), dataclasses.replace(settings, lora_fuse=True)),
    ]
    if args.jobs:
        by_name = {job[0]: job for job in jobs}
        jobs = [by_name[name] for name in args.jobs.split(",")]
    for name, job_input, job_settings in jobs:
        handler.configure(job_settings)
        try:
            run_job(name, job_input)
        except Exception as err:  # noqa: BLE001 - keep what was measured
            RESULTS["jobs"][name] = {"error": repr(err)[:400]}
            log(f"{name} failed: {err!r}"[:400])
        (args.out / "fast_preset.json").write_text(json.dumps(RESULTS, indent=1))
    j = RESULTS["jobs"]
    print("| job (480x832, 81 frames) | wall s | inference s | transformer calls | peak GiB |")
    print("|---|---|---|---|---|")
    for name, rec in j.items():
        if "error" in rec:
            print(f"| {name} | error: {rec['error'][:80]} | | | |")
        else:
            print(f"| {name} | {rec['wall_s']:.2f} | {rec['timings']['inference_s']:.2f} | "
                  f"{rec['transformer_calls']} | {rec['peak_alloc_GiB']:.1f} |")


if __name__ == "__main__":
    main()
