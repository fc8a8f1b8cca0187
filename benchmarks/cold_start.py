#!/usr/bin/env python3
"""Cold start: seconds from a fresh `python handler.py --test_input '<job>'` to its result, page cache evicted.

For each shape (input image WxH and frames; the worker sizes the video from the image, as for a user who
sends no height/width) and each configuration, the model files and the compile cache are dropped from the
page cache, then the worker starts in a new process as the Dockerfile's CMD starts it, with empty local
compiler caches as on a new machine, runs one short video job (2 steps: the figure is start-up cost, not
generation) and exits. The time is taken when the MP4 it writes under LOCAL_OUTPUT_DIR appears; the
result's own timings (read from runpod's "Job result" log line: the local handler writes only the media)
give the first job's s/step.

Configurations: default (no settings); speed-empty (WAN_FP8=1 WAN_COMPILE=1 WAN_VAE_DTYPE=bfloat16, the
compile cache emptied first); speed-cached (the same, with the cache that speed-empty or bench.py left);
plain (plain.py, the model card's recipe, in a fresh process).

    python benchmarks/cold_start.py --models /tmp/bench-models [--shapes 832x480x81,1024x768x33]
        [--configs default,speed-empty,speed-cached,plain] [--cache-dir /tmp/compile-cache] [--set K=V]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import disk as disk_probe
from bench import DEFAULT_MODELS, RESULTS, ROOT, meta, video_input, worker_env

import download_weights
import readahead
import weights

# gpu_session.sh's speed switches (its SPEED), so that "speed-cached" finds the cache `goals` wrote.
SPEED = {"WAN_FP8": "1", "WAN_FP8_ATTENTION": "1", "WAN_COMPILE": "1", "WAN_VAE_DTYPE": "bfloat16"}
CONFIGS = ("default", "speed-empty", "speed-cached", "plain")


def files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


def worker_result(log: str) -> dict:
    """The job's result, from runpod's "Job result:" log line."""
    line = next((line for line in reversed(log.splitlines()) if "Job result:" in line), None)
    if line is None:
        return {}
    result = ast.literal_eval(line.split("Job result:", 1)[1].strip())
    return result.get("output", result)  # runpod wraps the handler's return value


def phases(log: str) -> dict:
    """Where the start went, from the worker's own start-up lines: imports, reading weights (GB, GB/s),
    quantizing, placing, compiling (dynamo tracing, AOTAutograd, inductor) with torch's cache lookups, the warm-up."""
    out: dict = {}
    if found := re.search(r"start-up: imports ([\d.]+) s", log):
        out["imports_s"] = float(found[1])
    if found := re.search(r"Wan2.1 I2V loaded on \S+ in ([\d.]+) s: ([^(]*(?:\([^)]*GB/s\)[^(]*)?)", log):
        out["wan_load_s"] = float(found[1])
        for name, seconds in re.findall(r"(\w+) ([\d.]+) s", found[2]):
            out[f"wan_{name}_s"] = float(seconds)
        if rate := re.search(r"\(([\d.]+) GB at ([\d.]+) GB/s\)", found[2]):
            out["wan_weights_gb"], out["wan_weights_gb_per_s"] = float(rate[1]), float(rate[2])
    if found := re.search(r"read Wan2.1 I2V ahead: ([\d.]+) GB in ([\d.]+) s \(([\d.]+) GB/s", log):
        out["read_ahead_gb"], out["read_ahead_s"], out["read_ahead_gb_per_s"] = (float(v) for v in found.groups())
    if found := re.search(r"wan warm-up took ([\d.]+) s", log):
        out["wan_warm_up_s"] = float(found[1])
    if found := re.search(r"wan compiling: (.*); cache lookups: (.*)", log):
        for key, value in re.findall(r"(\w+) ([\d.]+)", found[1]):
            out[f"compile_{key}"] = float(value)
        out["cache_lookups"] = {key: int(value) for key, value in re.findall(r"(\w+) (\d+)", found[2])}
    return out


# Worker log lines that mark a cold start's progress, for its timeline (seconds after the process started).
EVENTS = {"read_ahead_done": "read Wan2.1 I2V ahead:", "imports_done": "start-up: imports",
          "wan_loaded": "Wan2.1 I2V loaded on", "warm_up_done": "wan warm-up took",
          "first_step_done": "denoise step 1/", "last_step_done": "denoise step {steps}/", "mp4_written": "wrote "}


def timeline(log: str, start: float, steps: int) -> dict[str, float]:
    """Seconds from the process start to each event of EVENTS, from the worker's time-stamped lines."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        if not (stamp := re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)):
            continue
        at = time.mktime(time.strptime(stamp[1], "%Y-%m-%d %H:%M:%S")) + int(stamp[2]) / 1000 - start
        for event, text in EVENTS.items():
            if text.format(steps=steps) in line and event not in out:
                out[event] = round(at, 2)
    return out


def disk(paths: list[Path], limit_gb: float) -> dict:
    """The disk's read speed on the first limit_gb of these files: one stream against the worker's read-ahead."""
    files, total = [], 0
    for path in paths:
        if total < limit_gb * 1e9:
            files.append(path)
            total += path.stat().st_size
    return disk_probe.measure(files)


def run(config: str, shape: str, args: argparse.Namespace, scratch: Path, tag: str = "") -> dict:
    width, height, frames = (int(v) for v in shape.split("x"))
    job_id = f"cold-{config}-{shape}{tag}"
    size = (width, height) if args.tiny else None  # tiny: no auto-sizing up to 480x832
    env = worker_env(args.models, dict(item.split("=", 1) for item in args.set))
    # A new worker's local compiler caches are empty: only COMPILE_CACHE_DIR (the volume) may hold kernels.
    local_caches = [scratch / f"inductor-{job_id}", scratch / f"triton-{job_id}"]
    env |= {"LOCAL_OUTPUT_DIR": str(scratch), "TORCHINDUCTOR_CACHE_DIR": str(local_caches[0]),
            "TRITON_CACHE_DIR": str(local_caches[1])}
    rec: dict = {"config": config, "shape": shape, "steps": args.steps}
    if config.startswith("speed"):
        env |= SPEED | {"COMPILE_CACHE_DIR": str(args.cache_dir)}
        if config == "speed-empty":
            shutil.rmtree(args.cache_dir, ignore_errors=True)
        rec["cache_files_before"] = len(files(args.cache_dir))
    if config == "plain":
        result_file = scratch / f"{job_id}.json"
        cmd = [sys.executable, "benchmarks/plain.py", "--models", str(args.models), "--image", f"{width}x{height}",
               "--frames", str(frames), "--steps", str(args.steps), "--out", str(result_file)]
        cmd += ["--size", f"{width}x{height}"] if size else []
    else:
        job = video_input(dict(frames=frames, image=(width, height), size=size), num_inference_steps=args.steps)
        cmd = [sys.executable, "handler.py", "--test_input", json.dumps({"id": job_id, "input": job})]
    rec["eviction"] = disk_probe.evict(files(args.models / "wan-i2v", args.cache_dir), everything=not args.tiny)
    log_path = scratch / f"{job_id}.log"
    start = time.time()
    try:
        with open(log_path, "w") as log:
            rec["rc"] = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        rec["rc"] = f"killed after {args.timeout} s"
    rec["exit_s"] = time.time() - start
    for folder in local_caches:
        shutil.rmtree(folder, ignore_errors=True)
    text = log_path.read_text(errors="replace")
    shutil.copy(log_path, args.out / f"{job_id}.log")  # every start's log beside the JSON: the phases' source
    if config == "plain":
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        if result:
            rec["start_to_result_s"] = result["finished_at"] - start
            rec.update({k: result[k] for k in ("load_s", "s_per_step", "width", "height")})
    else:
        mp4 = next((scratch / job_id).glob("*.mp4"), None)
        if mp4 is not None:
            rec["start_to_result_s"] = mp4.stat().st_mtime - start
        result = worker_result(text)
        timings = result.get("timings", {})
        rec.update(timings=timings, width=result.get("width"), height=result.get("height"))
        # The steady step: the time between the worker's logged step ends (the first step may still compile).
        stamps = [time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
                  for m in re.finditer(r"^(\S+ \S+),(\d+) INFO worker: job \S+: denoise step \d+/", text, re.M)]
        if len(stamps) >= 2:
            rec["s_per_step"] = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        rec["phases"] = phases(text)
        rec["timeline"] = timeline(text, start, args.steps)
    if "start_to_result_s" not in rec:
        rec["error"] = "no result"
        rec["log_tail"] = text.splitlines()[-15:]
    if config.startswith("speed"):
        rec["cache_files_after"] = len(files(args.cache_dir))
    return rec


def table(data: dict) -> str:
    lines = [f"{data['gpu']}, {data['date']}, torch {data['torch']}, {data['steps']}-step video job", "",
             "| shape -> video | configuration | start -> result s | imports s | read ahead s (GB/s) | "
             "Wan loaded at s | weights s (GB/s) | quantize s | warm-up s (trace / AOT / inductor) | "
             "aot_autograd hit/miss/bypass | first job s/step | rc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else str(round(value, digits))

    for rec in data["runs"].values():
        p, lookups = rec.get("phases", {}), rec.get("phases", {}).get("cache_lookups", {})
        weights_s = p.get("wan_weights_s") or rec.get("load_s")
        rate = f" ({cell(p.get('wan_weights_gb_per_s'), 2)})" if "wan_weights_gb_per_s" in p else ""
        compiling = (f" ({cell(p.get('compile_trace_s'))} / {cell(p.get('compile_aot_s'))} / "
                     f"{cell(p.get('compile_inductor_s'))})" if "compile_trace_s" in p else "")
        read = (f"{cell(p.get('read_ahead_s'))} ({cell(p.get('read_ahead_gb_per_s'), 2)})"
                if "read_ahead_s" in p else "-")
        aot = "/".join(str(lookups.get(f"autograd_cache_{k}", "-")) for k in ("hit", "miss", "bypass"))
        lines.append(f"| {rec['shape']} -> {rec.get('width')}x{rec.get('height')} | {rec['config']} | "
                     f"{cell(rec.get('start_to_result_s'))} | {cell(p.get('imports_s'))} | {read} | "
                     f"{cell(rec.get('timeline', {}).get('wan_loaded'))} | {cell(weights_s)}{rate} | "
                     f"{cell(p.get('wan_quantizing_s'))} | {cell(p.get('wan_warm_up_s'))}{compiling} | {aot} | "
                     f"{cell(rec.get('s_per_step'), 2)} | {rec['rc']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="random-weight models (bench.py builds them)")
    p.add_argument("--shapes", default="832x480x81,1024x768x33", help="input image WxH x frames, comma-separated")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"from {','.join(CONFIGS)}, run in this order")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="starts of each configuration and shape")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/compile-cache"), help="COMPILE_CACHE_DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="worker environment variable")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds one start may take")
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: explicit video size (the tests)")
    p.add_argument("--disk", type=float, default=0.0, metavar="GB",
                   help="first measure the disk on this many GB of the Wan files: one stream against the read-ahead")
    p.add_argument("--out", type=Path, default=RESULTS, help="writes OUT/cold_start.json and each start's log")
    args = p.parse_args(argv)
    if args.tiny and args.out == RESULTS:  # tiny figures never land beside the real ones
        args.out = Path(tempfile.gettempdir()) / "bench-tiny"
    if unknown := set(args.configs.split(",")) - set(CONFIGS):
        p.error(f"--configs takes {', '.join(CONFIGS)}; got {', '.join(sorted(unknown))}")
    if not download_weights.random_ready(args.models, "wan", "tiny" if args.tiny else "full"):
        # Random-weight models (in a child process: this one never holds the GPU while the starts are timed).
        subprocess.run([sys.executable, "download_weights.py", "--tiny" if args.tiny else "--random-full",
                        str(args.models), "--only", "wan"], cwd=ROOT, check=True)
    data = {**meta("cold_start.py", sys.argv[1:] if argv is None else argv), "steps": args.steps, "set": args.set,
            "shapes": args.shapes.split(","), "runs": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.disk:
        wan = args.models / "wan-i2v"
        data["disk"] = disk(readahead.weight_files(wan, weights.WAN_PARTS), args.disk)
        print(f"[cold] disk: {json.dumps(data['disk'])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cold-") as scratch:
        for shape in data["shapes"]:
            for config in args.configs.split(","):
                for n in range(1, args.repeat + 1):
                    rec = run(config, shape, args, Path(scratch), f"-{n}" if args.repeat > 1 else "")
                    data["runs"][f"{config} {shape}" + (f" #{n}" if args.repeat > 1 else "")] = rec
                    print(f"[cold] {config} {shape}: {json.dumps(rec)[:400]}", flush=True)
                    (args.out / "cold_start.json").write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))
    return 0 if all("error" not in rec for rec in data["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
