#!/usr/bin/env python3
"""One Wan2.1 video across 1, 2, 4 and 8 GPUs of one worker (NUM_GPUS, parallel.py): s/step, end to end,
peak memory per GPU and scaling efficiency.

    python benchmarks/multi_gpu.py                          # 1, 2, 4, 8 GPUs (those visible), 40 steps
    python benchmarks/multi_gpu.py --gpus 1,2 --steps 10 --set WAN_VAE_DTYPE=bfloat16
    python benchmarks/multi_gpu.py --tiny --gpus 1,2        # CPU, tiny models: checks the code, figures mean nothing

Each GPU count runs in a fresh process (the worker starts its ranks once per process) through the
worker's own `Worker.run`: one 2-step warm-up job (loading, NCCL set-up), then the timed job,
480x832, 81 frames, auto-sized from an 832x480 image, on random-weight models of the real
architectures (download_weights.py --random-full; a forward costs the same whatever the weights).
s/step is the median time between step ends; peak memory is nvidia-smi's per GPU (all ranks);
efficiency = s/step on 1 GPU / (N x s/step on N GPUs).
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

from bench import DEFAULT_MODELS, RESULTS, SEED, VIDEO_PROMPT, data_uri, input_image, meta


def measure(gpus: int, steps: int, models: Path, tiny: bool, overrides: dict[str, str]) -> dict:
    """In a fresh process: the worker with NUM_GPUS=gpus, one warm-up job, then the timed job."""
    import plain

    from settings import load_settings
    from worker import build_worker

    env = {"WAN_MODEL_ID": str(models / "wan-i2v"), "SDXL_MODEL_ID": str(models / "sdxl-base"),
           **overrides, "NUM_GPUS": str(gpus)}
    worker = build_worker(load_settings(env))  # as handler.main builds it: ranks started for NUM_GPUS > 1
    shape = {"num_frames": 5, "height": 64, "width": 80} if tiny else {}
    job = {"mode": "video", "prompt": VIDEO_PROMPT, "seed": SEED,
           "image_url": data_uri(input_image(*((80, 64) if tiny else (832, 480)))), **shape}
    warm = worker.run({"id": "warm-up", "input": {**job, "num_inference_steps": 2}})
    assert "error" not in warm, warm
    ends: list[float] = []
    # Each step's end, once the GPU is done with it.
    worker._progress = lambda _job: lambda phase, step, total: (plain.sync(), ends.append(time.perf_counter()))
    with GpuMemory() as memory:
        start = time.perf_counter()
        result = worker.run({"id": "timed", "input": {**job, "num_inference_steps": steps}})
        e2e = time.perf_counter() - start
    assert "error" not in result, result
    return {"gpus": gpus, "steps": steps, "size": f"{result['width']}x{result['height']}x{result['num_frames']}",
            "s_per_step": statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False)),
            "e2e_s": e2e, "timings": result["timings"], "warm_up_timings": warm["timings"],
            "peak_gib_per_gpu": memory.peak_gib[:gpus] if memory.peak_gib else None}


class GpuMemory:
    """Peak memory used per GPU, sampled from nvidia-smi every 200 ms (it sees every rank's process)."""

    def __init__(self) -> None:
        self.peak_gib: list[float] = []

    def __enter__(self) -> GpuMemory:
        try:
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,"
                                           "nounits", "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:  # no GPU (the --tiny check)
            self._proc = None
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            index, mib = (int(x) for x in line.split(","))
            self.peak_gib.extend([0.0] * (index + 1 - len(self.peak_gib)))
            self.peak_gib[index] = max(self.peak_gib[index], round(mib / 1024, 2))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._thread.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", help="comma-separated GPU counts (default: 1,2,4,8 up to the GPUs visible)")
    p.add_argument("--steps", type=int, help="steps of the timed job (default 40; --tiny 2)")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="random-weight models, built if "
                   f"missing (default {DEFAULT_MODELS}, bench.py's)")
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU (gloo ranks): checks the code only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="worker environment variable")
    p.add_argument("--out", type=Path, default=RESULTS / "multi-gpu.json")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one GPU count, in a fresh process
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    steps = args.steps or (2 if args.tiny else 40)
    if args.tiny:  # never mixed with the real figures
        if args.models == p.get_default("models"):
            args.models = Path(tempfile.gettempdir()) / "multi-gpu-tiny"
        if args.out == p.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "multi-gpu-tiny.json"
    if args.child:
        print(json.dumps(measure(args.child, steps, args.models, args.tiny, overrides)), flush=True)
        return 0
    import torch

    import download_weights

    size = "tiny" if args.tiny else "full"
    if not download_weights.random_ready(args.models, "wan", size):
        download_weights.build_random(args.models, size, {"wan"})
    visible = torch.cuda.device_count() or (2 if args.tiny else 0)
    counts = [int(n) for n in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= visible]
    rows = []
    for n in counts:
        cmd = [sys.executable, __file__, "--child", str(n), "--steps", str(steps), "--models", str(args.models),
               *(["--tiny"] if args.tiny else []), *(f"--set={item}" for item in args.set)]
        print(f"{n} GPU(s): {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            print(f"{n} GPU(s) failed with exit code {done.returncode}", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next((r["s_per_step"] for r in rows if r["gpus"] == 1), None)
    print("| GPUs | s/step | end to end s | peak GiB per GPU | scaling efficiency |\n|---|---|---|---|---|")
    for r in rows:
        r["efficiency"] = round(base / (r["gpus"] * r["s_per_step"]), 3) if base else None
        peak = max(r["peak_gib_per_gpu"]) if r["peak_gib_per_gpu"] else "n/a"
        print(f"| {r['gpus']} | {r['s_per_step']:.3f} | {r['e2e_s']:.1f} | {peak} | {r['efficiency']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta("multi_gpu.py", sys.argv[1:] if argv is None else argv),
                                    "settings": overrides, "steps": steps, "tiny": args.tiny, "runs": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if len(rows) == len(counts) else 1


if __name__ == "__main__":
    sys.exit(main())
