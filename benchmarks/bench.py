#!/usr/bin/env python3
"""The worker against plain diffusers, on random-weight models of the real architectures.

A forward pass costs the same whatever the weights hold, so full-size random models (download_weights.py
--random-full), loaded by the worker's own code, give honest seconds and memory. Each job runs through the
worker in this process (worker.Worker(plan.settings, ModelHandler(plan)).handle(job) with plan =
decide(settings), reading the result's own timings) and through the model cards' plain diffusers recipe
(plain.py), so every figure has a worker/plain ratio. Worker settings come as environment variables:
--set WAN_FP8=1 --set WAN_COMPILE=1 ...

    python benchmarks/bench.py                              # quick: 2 video steps; GPU
    python benchmarks/bench.py --full --goals               # 40 video steps; also writes goals.json
    python benchmarks/bench.py --tiny --out /tmp/b          # CPU, tiny models, the same code (the tests)
    python benchmarks/bench.py --goals --from OUT/bench-full.json --from OUT/bench-sdxl.json --cold-start OUT/cold.json

Jobs (--only): video81 (480x832, 81 frames, auto-sized from an 832x480 image), video33 (33 frames),
forward (one transformer forward on fixed inputs: the worker's levers' relative error against plain bf16),
fast (preset "fast": 4 steps, no CFG, a random rank-64 LoRA on every block linear, fused with LORA_FUSE=1),
image (SDXL's default job: 1024x1024, 25 base + 50 refiner steps). Fast and image run twice; the second
run is the figure (the first pays for fusing the LoRA or for one-time CUDA set-up).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime
import functools
import gc
import inspect
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the worker's modules, plain.py

SEED = 42
VIDEO_PROMPT = "A red fox trots across a snowy meadow at sunrise, soft light, the camera slowly follows it"
IMAGE_PROMPT = "A lighthouse on a rocky coast at dusk, dramatic clouds, highly detailed photograph"
JOBS = ("video81", "video33", "forward", "fast", "image")
WAN_JOBS = ("video81", "video33", "forward", "fast")
# The worker's speed and cold-start goals on one H100 or H200, in seconds.
GOALS = {"quality_e2e_s": 150.0, "quality_s_per_step": 3.6, "fast_e2e_s": 10.0, "sdxl_default_job_s": 1.8,
         "cold_start_default_s": 40.0, "cold_start_cached_s": 45.0, "cold_start_empty_s": 120.0}
DEFAULT_MODELS = Path("/tmp/bench-models")
RESULTS = ROOT / "benchmarks" / "results"


def videos(tiny: bool) -> dict[str, dict]:
    """Per video job: frames, input image (w, h), explicit video size (w, h) or None (derived from the image)."""
    if tiny:
        return {"video81": dict(frames=9, image=(64, 48), size=(64, 64)),
                "video33": dict(frames=5, image=(64, 48), size=(64, 64)),
                "fast": dict(frames=9, image=(64, 48), size=(64, 64))}
    return {name: dict(frames=frames, image=(832, 480), size=None)
            for name, frames in (("video81", 81), ("video33", 33), ("fast", 81))}


def meta(script: str, argv: list[str]) -> dict[str, Any]:
    """gpu, date, package versions and the command, without importing torch (cold_start.py uses it too)."""
    gpu = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        gpu = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in ("torch", "diffusers", "transformers", "fa3-fwd", "peft", "runpod"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"gpu": gpu or "CPU", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **versions, "command": shlex.join(["python", f"benchmarks/{script}", *argv])}


def input_image(width: int, height: int):
    """A smooth, deterministic test picture (small as PNG, so it fits a command line as base64)."""
    import numpy as np
    from PIL import Image, ImageDraw

    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    rgb = np.stack([0.2 + 0.6 * x + 0 * y, 0.3 + 0.5 * y + 0 * x, 0.8 - 0.5 * x * y], axis=-1)
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.3, height * 0.3, width * 0.55, height * 0.75), fill=(200, 90, 40))
    draw.rectangle((width * 0.65, height * 0.2, width * 0.85, height * 0.6), fill=(40, 120, 60))
    return image


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def frames_to_mp4(frames, fps: int, preset: str = "veryfast") -> bytes:
    """(F, H, W, 3) uint8 frames as the worker's MP4 (its own encoder, at once)."""
    from video_utils import Mp4Stream

    with Mp4Stream(frames.shape[2], frames.shape[1], fps, preset=preset) as mp4:
        mp4.write(frames)
        return mp4.finish()


def video_input(spec: dict, fields: dict | None = None, **extra: Any) -> dict:
    job = {"mode": "video", "image_url": data_uri(input_image(*spec["image"])), "prompt": VIDEO_PROMPT,
           "num_frames": spec["frames"], "seed": SEED, **(fields or {}), **extra}
    if spec["size"]:
        job.update(width=spec["size"][0], height=spec["size"][1])
    return job


def worker_env(models: Path, overrides: dict[str, str], lora: Path | None = None) -> dict[str, str]:
    """The worker's environment: these models, no RunPod or bucket, the fast preset's LoRA fused, then --set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_")) and k != "PRELOAD_MODELS"}
    env.update(MODEL_DIR=str(models), SDXL_MODEL_ID=str(models / "sdxl-base"),
               SDXL_REFINER_ID=str(models / "sdxl-refiner"), SDXL_VAE_ID=str(models / "sdxl-vae"),
               WAN_MODEL_ID=str(models / "wan-i2v"), LORA_FUSE="1", PYTHONUNBUFFERED="1")
    if lora is not None:
        env["WAN_FAST_LORA"] = str(lora)
    return env | overrides


def write_lora(path: Path, size: str, rank: int) -> int:
    """A PEFT-format LoRA on every block linear of the Wan transformer (lightx2v's distill LoRAs: rank 64)."""
    import torch
    from safetensors.torch import save_file

    import download_weights

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = download_weights.random_component("wan_transformer", size, "meta")
    g = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
            a = torch.randn(rank, module.in_features, generator=g, device=device) * module.in_features**-0.5
            b = torch.randn(module.out_features, rank, generator=g, device=device) * 1e-3
            tensors[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
            tensors[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").rename(path)
    return path.stat().st_size


def forward(transformer, frames: int, width: int, height: int) -> tuple[Any, float]:
    """One transformer forward (the second of two) on fixed random inputs of a video job's shape."""
    import plain
    import torch

    config = getattr(transformer, "_orig_mod", transformer).config
    device, dtype = plain._device()
    g = torch.Generator("cpu").manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8,
                                            generator=g),
                  encoder_hidden_states=torch.randn(1, 512, config.text_dim, generator=g),
                  encoder_hidden_states_image=torch.randn(1, 257, config.image_dim, generator=g))
    inputs = {k: v.to(device, dtype) for k, v in inputs.items()}
    # As in a user job: code compiled at the worker's warm-up runs compiled, anything else eager (no compile here).
    with torch.no_grad(), torch.compiler.set_stance("eager_on_recompile"):
        for _ in range(2):
            plain.sync()
            start = time.perf_counter()
            out = transformer(**inputs, timestep=torch.tensor([500], device=device), return_dict=False)[0]
            plain.sync()
    return out.float().cpu(), time.perf_counter() - start


def twice(run) -> dict:
    """The second of two runs, and the first's seconds (fusing a LoRA, CUDA graphs and kernels set up)."""
    first = run()
    return run() | {"first_e2e_s": first["e2e_s"]}


def free_gpu() -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()  # compiled blocks keep their modules alive
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = "tiny" if args.tiny else "full"
        self.mode = "tiny" if args.tiny else ("full" if args.full else "quick")
        self.steps = args.steps or (40 if args.full else 2)
        self.videos = videos(args.tiny)
        self.jobs = [j.strip() for j in args.only.split(",")] if args.only else list(JOBS)
        if unknown := set(self.jobs) - set(JOBS):
            raise SystemExit(f"--only takes {', '.join(JOBS)}; got {', '.join(sorted(unknown))}")
        self.set = dict(item.split("=", 1) for item in args.set)
        self.fields = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.field)}
        self.models = (args.models or (Path(tempfile.mkdtemp(prefix="bench-tiny-")) if args.tiny else
                                       DEFAULT_MODELS)).resolve()  # absolute: the LoRA must lie under MODEL_DIR
        self.path = args.out / f"bench-{args.tag or self.mode}.json"
        self.lora: Path | None = None
        self.results: dict[str, Any] = {
            **meta("bench.py", args.argv), "mode": self.mode, "video_steps": self.steps, "set": self.set,
            "fields": self.fields, "gpu_gib": args.gpu_gib, "models": str(self.models), "jobs": {}, "worker": {},
            "plain": {}, "errors": []}

    def save(self) -> None:
        for job in self.results["jobs"].values():
            w, p = job.get("worker", {}), job.get("plain", {})
            job["worker/plain"] = {k: round(w[k] / p[k], 3) for k in ("e2e_s", "s_per_step", "peak_gib", "forward_s")
                                   if isinstance(w.get(k), float) and isinstance(p.get(k), float) and p[k]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=1, default=str))

    def record(self, job: str, impl: str, fn) -> None:
        """Run one measurement; an exception is recorded and the run goes on."""
        try:
            rec = fn()
        except Exception as err:  # noqa: BLE001 - keep what was measured
            rec = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            self.results["errors"].append({"job": job, "impl": impl, "traceback": traceback.format_exc()[-1500:]})
        self.results["jobs"].setdefault(job, {})[impl] = rec
        print(f"[bench] {job} {impl}: {json.dumps(rec, default=str)[:300]}", flush=True)
        self.save()

    def prepare(self) -> None:
        import download_weights

        groups = ({"wan"} if set(self.jobs) & set(WAN_JOBS) else set()) | ({"sdxl"} if "image" in self.jobs else set())
        for group in sorted(groups):
            if not download_weights.random_ready(self.models, group, self.size):
                self.results.setdefault("build_s", {}).update(
                    download_weights.build_random(self.models, self.size, {group}))
        if "fast" in self.jobs:
            rank = 64 if self.size == "full" else 4
            self.lora = self.models / "loras" / f"fast-rank{rank}.safetensors"
            if not self.lora.exists():
                self.results["lora_bytes"] = write_lora(self.lora, self.size, rank)

    def run(self) -> None:
        self.prepare()
        self.save()
        if self.args.gpu_gib:  # a smaller card: the allocator stops there (less the CUDA context's ~0.5 GiB)
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (self.args.gpu_gib - 0.5) * 2**30 / total))
        for impl in ("worker", "plain"):
            if impl in self.args.impl:
                try:
                    getattr(self, impl)()
                except Exception:  # noqa: BLE001 - a failed load or start-up: recorded, the other side still runs
                    self.results["errors"].append({"impl": impl, "traceback": traceback.format_exc()[-3000:]})
                    print(traceback.format_exc(), flush=True)
                free_gpu()
                self.save()

    def job_params(self) -> dict[str, Any]:
        """Each job as the worker's schema reads it (defaults filled in): the plain recipe runs the same job."""
        from schemas import validate_input
        from settings import load_settings

        settings = load_settings(worker_env(self.models, self.set, self.lora))
        params = {name: validate_input(self.video_job(name), settings) for name in self.videos if name in self.jobs}
        return params | ({"image": validate_input(self.image_input(), settings)} if "image" in self.jobs else {})

    # ---------------------------------------------------------------- the worker, as deployed
    def worker(self) -> None:
        import plain

        from model_handler import ModelHandler
        from plan import Device, decide
        from schemas import validate_input
        from settings import load_settings
        from worker import Worker

        device = Device.find()
        device = dataclasses.replace(device, memory_gib=self.args.gpu_gib) if self.args.gpu_gib else device
        plan = decide(load_settings(worker_env(self.models, self.set, self.lora)), device)
        if plan.settings.num_gpus > 1:
            raise SystemExit("bench.py measures one GPU; benchmarks/multi_gpu.py measures NUM_GPUS above 1")
        settings, models = plan.settings, ModelHandler(plan)
        worker = Worker(settings, models)
        out = self.results["worker"]
        out["settings"] = settings.summary()
        start = time.perf_counter()
        out["start_up"] = worker.start_up()  # preloads and compile warm-ups, as at the worker's start
        out["start_up_s"] = time.perf_counter() - start

        def job(name: str, model: Any, job_input: dict) -> dict:
            steps_cb = plain.Steps()
            # The video model's step-end hook stamps each step (SDXL has none: its jobs report no s/step).
            stepped = "on_step" in inspect.signature(model.generate).parameters
            if stepped:
                model.generate = functools.partial(model.generate, on_step=steps_cb.stamp)
            plain.reset_peak()
            start = time.perf_counter()
            try:
                # What RunPod calls: the async handler, which runs the job on the worker's job thread.
                result = asyncio.run(worker.handle({"id": f"bench-{name}", "input": job_input}))
            finally:
                if stepped:
                    del model.generate  # the class's own again
            e2e = time.perf_counter() - start
            if "error" in result:
                raise RuntimeError(result["error"])
            if "images" in result:  # what the random models draw, for `encode.py --image`
                png = base64.b64decode(result["images"][0].split(",", 1)[1])
                (self.args.out / f"{name}-{self.args.tag or self.mode}.png").write_bytes(png)
            timings, steps = result.get("timings", {}), validate_input(job_input, settings).num_inference_steps
            s_per_step = steps_cb.s_per_step()
            if s_per_step is None and job_input["mode"] == "video":  # no step hook: an upper bound
                s_per_step = timings["inference_s"] / steps
            return {"e2e_s": e2e, "s_per_step": s_per_step, "steps": steps, "peak_gib": plain.peak_gib(),
                    "width": result.get("width"), "height": result.get("height"), "timings": timings}

        if wan_jobs := [j for j in WAN_JOBS if j in self.jobs]:
            wan, out["load_wan_s"] = models.model("video")  # 0 when start-up loaded it
            for name in wan_jobs:
                if name == "forward":
                    self.record(name, "worker", lambda: self.forward("worker", wan.pipe.transformer))
                elif name == "fast":  # last: the fused LoRA stays in the weights
                    self.record(name, "worker", lambda: twice(lambda: job("fast", wan, self.video_job("fast"))))
                else:
                    self.record(name, "worker", lambda n=name: job(n, wan, self.video_job(n)))
        if "image" in self.jobs:
            sdxl, out["load_sdxl_s"] = models.model("image")  # parks Wan first if both do not fit
            self.record("image", "worker", lambda: twice(lambda: job("image", sdxl, self.image_input())))

    def video_job(self, name: str) -> dict:
        extra = {"preset": "fast"} if name == "fast" else {"num_inference_steps": self.steps}
        return video_input(self.videos[name], self.fields, **extra)

    def image_input(self) -> dict:
        tiny = {"height": 128, "width": 128, "num_inference_steps": 4, "refiner_inference_steps": 4}
        return {"mode": "image", "prompt": IMAGE_PROMPT, "seed": SEED, **(tiny if self.size == "tiny" else {})}

    def forward(self, impl: str, transformer: Any) -> dict:
        spec = self.videos["video81"]
        width, height = spec["size"] or (832, 480)
        out, seconds = forward(transformer, spec["frames"], width, height)
        rec: dict[str, Any] = {"forward_s": seconds, "shape": f"{height}x{width}x{spec['frames']}"}
        if impl == "worker":
            self._worker_forward = out
        elif getattr(self, "_worker_forward", None) is not None:  # the worker's levers against plain bf16
            rec["worker_rel_err"] = float((self._worker_forward - out).norm() / out.norm())
        return rec

    # ---------------------------------------------------------------- plain diffusers, the model cards' recipe
    def plain(self) -> None:
        import plain

        params = self.job_params()
        out = self.results["plain"]
        if wan_jobs := [j for j in WAN_JOBS if j in self.jobs]:
            start = time.perf_counter()
            pipe = plain.load_wan(self.models / "wan-i2v")
            out["load_wan_s"] = time.perf_counter() - start

            def video(name: str) -> dict:
                spec, p = self.videos[name], params[name]
                return plain.run_video(pipe, input_image(*spec["image"]), prompt=p.prompt, seed=p.seed,
                                       negative_prompt=p.negative_prompt, frames=p.num_frames,
                                       steps=p.num_inference_steps, guidance=p.guidance_scale,
                                       flow_shift=p.flow_shift, size=spec["size"])

            for name in wan_jobs:
                if name == "forward":
                    self.record(name, "plain", lambda: self.forward("plain", pipe.transformer))
                elif name == "fast":
                    plain.fuse_lora(pipe, self.lora)
                    self.record(name, "plain", lambda: twice(lambda: video("fast")))
                else:
                    self.record(name, "plain", lambda n=name: video(n))
            del pipe
            free_gpu()
        if "image" in self.jobs:
            start = time.perf_counter()
            base, refiner = plain.load_sdxl(self.models)
            out["load_sdxl_s"] = time.perf_counter() - start
            p = params["image"]

            def image() -> dict:
                return plain.run_image(base, refiner, prompt=p.prompt, width=p.width, height=p.height,
                                       steps=p.num_inference_steps, refiner_steps=p.refiner_inference_steps,
                                       high_noise_frac=p.high_noise_frac, guidance=p.guidance_scale, seed=p.seed)

            self.record("image", "plain", lambda: twice(image))


def goals(bench: dict, cold: dict | None) -> dict:
    """goals.json: each goal's figure as {"worker": x, "plain": y}; cold starts from cold_start.py's JSON."""
    jobs = bench.get("jobs", {})

    def pair(job: str, key: str) -> dict:
        return {impl: jobs.get(job, {}).get(impl, {}).get(key) for impl in ("worker", "plain")}

    def cold_pair(config: str) -> dict:
        runs = (cold or {}).get("runs", {})
        shape = ((cold or {}).get("shapes") or [""])[0]
        return {"worker": runs.get(f"{config} {shape}", {}).get("start_to_result_s"),
                "plain": runs.get(f"plain {shape}", {}).get("start_to_result_s")}

    return {"gpu": bench["gpu"], "date": bench["date"], "torch": bench["torch"],
            "command": bench["command"] + (f" ; {cold['command']}" if cold else ""),
            "figures": {"quality_e2e_s": pair("video81", "e2e_s"), "quality_s_per_step": pair("video81", "s_per_step"),
                        "fast_e2e_s": pair("fast", "e2e_s"), "sdxl_default_job_s": pair("image", "e2e_s"),
                        "cold_start_default_s": cold_pair("default"), "cold_start_cached_s": cold_pair("speed-cached"),
                        "cold_start_empty_s": cold_pair("speed-empty")}}


def fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) and value < 10 else (
        f"{value:.1f}" if isinstance(value, float) else ("-" if value is None else str(value)))


def goals_table(data: dict) -> str:
    lines = [f"{data['gpu']}, {data['date']}, torch {data['torch']}: `{data['command']}`", "",
             "| figure | goal | worker | plain diffusers | worker/plain | met |", "|---|---|---|---|---|---|"]
    for name, fig in data["figures"].items():
        w, p, goal = fig.get("worker"), fig.get("plain"), GOALS[name]
        ratio = w / p if isinstance(w, float) and isinstance(p, float) and p else None
        met = "-" if w is None else ("yes" if w <= goal else f"no (+{(w / goal - 1) * 100:.0f}%)")
        lines.append(f"| {name} | <= {goal:g} | {fmt(w)} | {fmt(p)} | {fmt(ratio)} | {met} |")
    return "\n".join(lines)


def jobs_table(results: dict) -> str:
    lines = [f"{results['gpu']}, {results['date']}, {results['mode']}, video steps {results['video_steps']}, "
             f"--set {results['set'] or 'none'}", "", "| job | figure | worker | plain | worker/plain |",
             "|---|---|---|---|---|"]
    for job, recs in results["jobs"].items():
        w, p, r = recs.get("worker", {}), recs.get("plain", {}), recs.get("worker/plain", {})
        for key in ("e2e_s", "first_e2e_s", "s_per_step", "peak_gib", "forward_s", "worker_rel_err", "error"):
            if w.get(key) is not None or p.get(key) is not None:
                lines.append(f"| {job} | {key} | {fmt(w.get(key))} | {fmt(p.get(key))} | {fmt(r.get(key))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="40 video steps (default: 2, 'quick')")
    size.add_argument("--tiny", action="store_true", help="tiny models on CPU: checks the code, figures mean nothing")
    p.add_argument("--only", help=f"comma-separated jobs from {','.join(JOBS)} (default: all)")
    p.add_argument("--impl", default="worker,plain", help="worker, plain or both (default)")
    p.add_argument("--steps", type=int, help="video steps of video81/video33 (quick 2, full 40)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="worker environment variable")
    p.add_argument("--field", action="append", default=[], metavar="KEY=JSON",
                   help='extra field of every video job, e.g. --field step_cache=\'"first_block"\'')
    p.add_argument("--gpu-gib", type=float, help="emulate a card of this many GiB (the worker plans for it)")
    p.add_argument("--models", type=Path, help=f"random-weight models, built if missing (default {DEFAULT_MODELS})")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON (default benchmarks/results)")
    p.add_argument("--tag", help="results file name: OUT/bench-TAG.json (default: the mode)")
    p.add_argument("--goals", action="store_true", help="also write OUT/goals.json and print the goals table")
    p.add_argument("--from", dest="from_json", type=Path, action="append",
                   help="with --goals: use these results (repeat to join runs of different jobs), run nothing")
    p.add_argument("--cold-start", type=Path, help="cold_start.py's JSON for goals.json (default OUT/cold_start.json)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.tiny and args.out == RESULTS:  # tiny figures never land beside the real ones
        args.out = Path(tempfile.gettempdir()) / "bench-tiny"
    if any("=" not in item for item in args.set):
        p.error(f"--set takes KEY=VALUE, got {args.set}")
    if args.from_json:
        runs = [json.loads(path.read_text()) for path in args.from_json]
        results = {**runs[0], "command": " ; ".join(run["command"] for run in runs),
                   "jobs": {job: rec for run in runs for job, rec in run["jobs"].items()},
                   "errors": [err for run in runs for err in run["errors"]]}
    else:
        bench = Bench(args)
        bench.run()
        results = bench.results
        print(jobs_table(results))
    if args.goals:
        cold_path = args.cold_start or args.out / "cold_start.json"
        cold = json.loads(cold_path.read_text()) if cold_path.is_file() else None
        data = goals(results, cold)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "goals.json").write_text(json.dumps(data, indent=1) + "\n")
        print(goals_table(data))
        if results.get("video_steps") != 40:
            print(f"Note: video81 ran {results.get('video_steps')} steps; the quality goals are for 40 (--full).")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
