"""SDXL base at 1024x1024 with CFG: where the pipeline's time goes, and which lever removes it.

The UNet alone runs ~15 it/s on an H100 (levers.py) while the pipeline's steps measured slower;
this probe times the base pipeline's denoising loop without per-step synchronisation (the
difference of a 25-step and a 5-step call, so text encoding and set-up cancel out), the UNet
alone, the share of each step the GPU is busy (torch.profiler), and these levers: the worker's
default DDIM against Euler, fused QKV projections, the UNet under CUDA graphs (torch.compile
backend "cudagraphs", no code generation) and compiled with mode "reduce-overhead". Full-size
random weights from bench.py's build (run `bench.py --only build` first). `--only worker` compares
the worker's own SDXL (loaded and warmed up as at start-up, --set e.g. SDXL_COMPILE=1) with the
plain model-card pipelines: base denoising it/s and the default job (25 base + 50 refiner steps).

    python benchmarks/sdxl_speed.py [--workdir /tmp/bench-models] [--budget-s 400] [--only levers,worker]
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

from bench import script_record  # noqa: E402

START = time.perf_counter()
RESULTS, log = script_record("sdxl-speed")
PROMPT = "A lighthouse on a rocky coast at dusk, dramatic clouds, highly detailed photograph"


def loop_it_s(pipe, scheduler: str, short: int = 5, long: int = 25) -> tuple[float, float]:
    """Denoising steps per second of the base pipeline (no VAE decode), and the 25-step call's seconds."""
    from model_handler import make_scheduler

    def call(steps: int) -> float:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompt=PROMPT, height=1024, width=1024, num_inference_steps=steps, guidance_scale=7.5,
             output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    call(short)  # warm-up (and, for compiled UNets, the compilation)
    times = {n: sorted(call(n) for _ in range(2))[0] for n in (short, long)}
    return (long - short) / (times[long] - times[short]), times[long]


def unet_alone_it_s(unet) -> float:
    lat = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
    enc = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
    added = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
             "time_ids": torch.randn(2, 6, device="cuda", dtype=torch.float16)}
    t = torch.tensor(500, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            unet(lat, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            unet(lat, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)
        torch.cuda.synchronize()
    return 20 / (time.perf_counter() - start)


def gpu_busy_share(pipe, steps: int = 6) -> float:
    """Kernel time over wall time of a short base call: how much of each step the GPU actually works."""
    from torch.profiler import ProfilerActivity, profile

    pipe(prompt=PROMPT, height=1024, width=1024, num_inference_steps=steps, output_type="latent")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        pipe(prompt=PROMPT, height=1024, width=1024, num_inference_steps=steps, output_type="latent")
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return kernel_us / 1e6 / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-models"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "sdxl-speed-out")))
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--only", default="levers", help="levers (plain pipeline variants), worker, or both")
    parser.add_argument("--set", action="append", default=[], help="worker setting for the worker part, K=V")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    if "levers" in parts:
        levers(args)
    if "worker" in parts:
        worker(args)


def default_job_s(run) -> float:
    """Seconds of the worker's default image job (25 base + 50 refiner steps, ensemble of experts)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    """The worker's own SDXL (handler.configure, warm-up as at start-up) against the plain pipelines."""
    from bench import plain_load_sdxl, worker_env

    import handler
    from model_handler import _compiled_only
    from settings import load_settings

    res = RESULTS.setdefault("worker_vs_plain", {})
    out = args.out / "sdxl-speed.json"
    job = {"prompt": PROMPT, "seed": 1}
    plain = dict(zip(("base", "refiner"), plain_load_sdxl(args.workdir / "sdxl-base", args.workdir / "sdxl-refiner",
                                                          True), strict=True))

    def plain_job() -> None:
        latents = plain["base"](prompt=PROMPT, num_inference_steps=25, denoising_end=0.8, output_type="latent").images
        plain["refiner"](prompt=PROMPT, num_inference_steps=50, denoising_start=0.8, image=latents)

    plain_job()  # CUDA warm-ups (handles, kernels) outside the figures
    res["plain_loop_it_s"] = loop_it_s(plain["base"], "K_EULER")[0]  # the model card's scheduler
    res["plain_default_job_s"] = min(default_job_s(plain_job) for _ in range(2))
    log(f"plain: {res['plain_loop_it_s']:.2f} it/s, default job {res['plain_default_job_s']:.2f}s")
    plain.clear()
    torch.cuda.empty_cache()
    overrides = dict(item.split("=", 1) for item in args.set)
    models = handler.configure(load_settings(worker_env(args.workdir, overrides)))
    res["settings"] = overrides
    start = time.perf_counter()
    models.prepare("image")
    res["load_s"] = time.perf_counter() - start
    res["warm_up_s"] = models.compile_now("image")
    with _compiled_only(models.compiled("image")):
        res["worker_loop_it_s"] = loop_it_s(models.base, "DDIM")[0]  # the worker's default scheduler
    times = []
    for i in range(2):
        result = {}
        times.append(default_job_s(lambda: result.update(handler.handler({"id": f"img{i}", "input": job}))))  # noqa: B023
        if "error" in result:
            res["error"] = result["error"]
    res["worker_default_job_s"] = min(times)
    log(f"worker: {res['worker_loop_it_s']:.2f} it/s, default job {res['worker_default_job_s']:.2f}s "
        f"(warm-up {res['warm_up_s'] or 0:.0f}s)")
    out.write_text(json.dumps(RESULTS, indent=1))
    print("| SDXL 1024x1024, CFG | plain diffusers | worker | worker/plain |\n|---|---|---|---|")
    print(f"| base denoising it/s | {res['plain_loop_it_s']:.2f} | {res['worker_loop_it_s']:.2f} | "
          f"{res['worker_loop_it_s'] / res['plain_loop_it_s']:.2f} |")
    print(f"| default job s (25 base + 50 refiner steps, PNG) | {res['plain_default_job_s']:.2f} | "
          f"{res['worker_default_job_s']:.2f} | {res['worker_default_job_s'] / res['plain_default_job_s']:.2f} |")


def levers(args: argparse.Namespace) -> None:

    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(str(args.workdir / "sdxl-vae"), dtype=torch.float16)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(args.workdir / "sdxl-base"), vae=vae, dtype=torch.float16,
                                                     variant="fp16", add_watermarker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    res = RESULTS.setdefault("sdxl_base_1024", {})

    def record(name: str, fn) -> None:
        if time.perf_counter() - START > args.budget_s:
            res[name] = {"skipped": "over the time budget"}
            return
        try:
            start = time.perf_counter()
            res[name] = fn()
            res[name]["probe_s"] = time.perf_counter() - start
            log(f"{name}: {res[name]}")
        except Exception as err:  # noqa: BLE001 - keep what was measured
            res[name] = {"error": repr(err)[:400]}
            log(f"{name} failed: {err!r}"[:400])
        (args.out / "sdxl-speed.json").write_text(json.dumps(RESULTS, indent=1))

    def pipeline(scheduler: str) -> dict:
        it_s, call_s = loop_it_s(pipe, scheduler)
        return {"loop_it_s": it_s, "call_25_steps_s": call_s}

    record("unet_alone_eager", lambda: {"it_s": unet_alone_it_s(pipe.unet)})
    record("pipeline_ddim_eager", lambda: pipeline("DDIM"))
    record("pipeline_euler_eager", lambda: pipeline("K_EULER"))
    record("gpu_busy_ddim_eager", lambda: {"share": gpu_busy_share(pipe)})
    pipe.unet.fuse_qkv_projections()
    record("pipeline_ddim_fused_qkv", lambda: pipeline("DDIM"))
    eager_unet = pipe.unet
    pipe.unet = torch.compile(eager_unet, backend="cudagraphs")
    record("pipeline_ddim_cudagraphs", lambda: pipeline("DDIM"))
    record("unet_alone_cudagraphs", lambda: {"it_s": unet_alone_it_s(pipe.unet)})
    torch._dynamo.reset()
    pipe.unet = torch.compile(eager_unet, mode="reduce-overhead", fullgraph=True)
    record("pipeline_ddim_reduce_overhead", lambda: pipeline("DDIM"))
    record("unet_alone_reduce_overhead", lambda: {"it_s": unet_alone_it_s(pipe.unet)})
    (args.out / "sdxl-speed.json").write_text(json.dumps(RESULTS, indent=1))
    print("| SDXL base 1024x1024, CFG | it/s | note |\n|---|---|---|")
    for name, rec in res.items():
        value = rec.get("loop_it_s") or rec.get("it_s") or rec.get("share")
        print(f"| {name} | {value if value is None else round(value, 3)} | "
              f"{rec.get('error') or rec.get('skipped') or ''} |")


if __name__ == "__main__":
    main()
