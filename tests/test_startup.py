"""Start-up as deployed: `python handler.py` in a subprocess, as the Dockerfile's CMD starts it, with the
start-up switches on (WAN_COMPILE, SDXL_COMPILE, PRELOAD_MODELS, WAN_FP8, COMPILE_CACHE_DIR); jobs of other
shapes than the warm-up's afterwards; a failed start-up that leaves the worker serving; the compile cache
shared by two worker processes; a native crash's Python stacks in the log; and a start-up log free of
third-party notices that read like failures."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys

import numpy as np
from conftest import ROOT, decode_data_uri, png_b64
from media import probe_mp4
from test_cli import run
from test_worker import IMAGE, VIDEO, pngs

# What a start-up may print: the worker's own lines and runpod's. Anything else (a library's warning,
# a progress bar, a traceback) is noise a RunPod user would read as a failure.
OWN_LINE = re.compile(r"^(\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING|ERROR) worker: |(INFO|WARN|ERROR) +\| |"
                      r"--- Starting Serverless Worker)")


def foreign_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.strip() and not OWN_LINE.match(line)]


def test_speed_switches_start_quietly_and_a_second_worker_reuses_the_compile_cache(tiny_env, tmp_path):
    """Two workers of one endpoint, one after the other, sharing COMPILE_CACHE_DIR (the network volume)
    but not the local inductor cache: the first compiles and writes the cache, the second loads it."""
    job = {"input": {**VIDEO, "image_url": png_b64(64, 48), "height": 96, "width": 128, "num_frames": 13}}
    env = tiny_env | {"WAN_COMPILE": "1", "WAN_FP8": "1", "COMPILE_CACHE_DIR": str(tmp_path / "volume")}
    logs = []
    for n in (1, 2):
        local = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"local-{n}"),
                 "LOCAL_OUTPUT_DIR": str(tmp_path / f"out-{n}")}
        out = run([sys.executable, "handler.py", "--test_input", json.dumps(job)], env | local)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-3000:]
        video = probe_mp4((tmp_path / f"out-{n}" / "local_test" / "video.mp4").read_bytes())
        assert (video["frames"], video["width"], video["height"]) == (13, 128, 96)
        assert foreign_lines(log) == [], log[-3000:]
        # The float8 layers run on CPU too (torch._scaled_mm's CPU kernel): the same compiled graph as on a GPU.
        assert re.search(r"Wan2.1 I2V loaded on cpu in [\d.]+ s: imports [\d.]+ s, weights [\d.]+ s \([\d.]+ GB at "
                         r"[\d.]+ GB/s\), quantizing [\d.]+ s, placing [\d.]+ s \(profile full, fp8 True", log), log
        logs.append(log)
        assert re.search(r"reading Wan2.1 I2V ahead: .* from the process start \(as Wan loads at start-up\)", log)
    assert re.search(r"wan warm-up took [\d.]+ s \(compiled; cache written to .*/volume/wan-\w+\.bin\)", logs[0])
    assert re.search(r"wan warm-up took [\d.]+ s \([1-9]\d* compiled graphs from the compile cache", logs[1]), logs[1]
    # The second worker finds the traced float8 graph (AOTAutograd's) in the cache, not only inductor's kernels:
    # a float8 tensor subclass (torchao's) made that cache miss or bypass.
    lookups = [{key: int(n) for key, n in re.findall(r"(\w+_cache_\w+) (\d+)", re.search(r"wan compiling: .*", log)[0])}
               for log in logs]
    assert lookups[0]["autograd_cache_miss"] >= 1 and lookups[0]["autograd_cache_hit"] == 0, lookups
    assert lookups[1]["autograd_cache_hit"] >= 1 and lookups[1]["autograd_cache_bypass"] == 0, lookups
    assert lookups[1]["fxgraph_cache_hit"] >= 1 and lookups[1]["fxgraph_cache_miss"] == 0, lookups
    assert [p.suffix for p in (tmp_path / "volume").iterdir()] == [".bin"]


def test_every_start_up_switch_on_then_jobs_of_other_shapes(start_api):
    server = start_api({"WAN_COMPILE": "1", "SDXL_COMPILE": "1", "PRELOAD_MODELS": "sdxl,wan", "WAN_FP8": "1",
                        "WAN_FP8_ATTENTION": "1", "COMPILE_CACHE_DIR": "off"}, ready_timeout_s=600)
    log = server.log()
    assert "sdxl warm-up took" in log and "wan warm-up took" in log, log[-3000:]
    assert "start-up of" not in log  # nothing failed
    assert "fp8 attention True" in log  # float8 attention runs on CPU too (emulated), so it is tested compiled
    video = server.runsync({**VIDEO, "image_url": png_b64(), "height": 80, "width": 112, "num_frames": 5})["output"]
    assert (probe_mp4(decode_data_uri(video["video"], "video/mp4"))["frames"], video["width"]) == (5, 112)
    auto = server.runsync({**VIDEO, "image_url": png_b64(48, 64), "height": None, "width": None})["output"]
    assert (auto["width"], auto["height"]) == (544, 720)  # a portrait image: a portrait video
    image = server.runsync({**IMAGE, "height": 128, "width": 136})["output"]
    assert [im.size for im in pngs(image)] == [(136, 128)]


def test_a_start_up_that_fails_logs_one_line_and_the_worker_keeps_serving(start_api, tmp_path):
    missing = tmp_path / "no-weights"
    server = start_api({"WAN_MODEL_ID": str(missing), "WAN_COMPILE": "1", "PRELOAD_MODELS": "wan"})
    failed = [line for line in server.log().splitlines() if "start-up of wan failed" in line]
    assert len(failed) == 1, server.log()[-3000:]
    assert "the worker keeps serving (ModelUnavailable: WAN_MODEL_ID=" in failed[0]
    video = server.runsync({**VIDEO, "image_url": png_b64()})
    assert video["error"].startswith(f"WAN_MODEL_ID='{missing}' is not a model folder")
    image = server.runsync(IMAGE)["output"]  # the other mode is unaffected
    assert [im.size for im in pngs(image)] == [(192, 128)]
    assert server.proc.poll() is None


def test_a_worker_that_crashes_in_native_code_leaves_its_python_stacks_in_the_log(start_api):
    server = start_api()
    server.proc.send_signal(signal.SIGSEGV)  # as a crash in a native library would end it
    assert server.proc.wait(timeout=30) == -signal.SIGSEGV
    log = server.log()
    assert "Fatal Python error: Segmentation fault" in log
    assert re.search(r'File ".*handler\.py", line \d+ in main', log), log[-2000:]  # where the crash came


def test_the_dockerfile_starts_the_worker_the_way_these_tests_do():
    cmd = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD")]
    assert cmd == ['CMD ["python", "-u", "handler.py"]']


def test_a_stored_float8_transformer_is_read_instead_of_quantizing_and_gives_the_same_video(tiny_env, tmp_path):
    """download_weights.py --fp8 stores WAN_FP8's transformer beside the bf16 one; a WAN_FP8 worker then reads it
    (fewer bytes, no quantizing at start) and makes the video a worker quantizing at start makes, frame for frame."""
    wan = tmp_path / "wan-i2v"
    shutil.copytree(tiny_env["WAN_MODEL_ID"], wan)
    made = run([sys.executable, "download_weights.py", "--compact", str(wan), "--fp8"], {})
    assert made.returncode == 0 and (wan / "transformer-fp8").is_dir(), made.stdout[-2000:] + made.stderr[-2000:]
    job = {"input": {**VIDEO, "image_url": png_b64(64, 48), "height": 64, "width": 96, "num_frames": 9}}
    frames, lines = [], []
    for stored in (True, False):
        if not stored:
            (wan / "transformer-fp8").rename(tmp_path / "put-aside")
        out_dir = tmp_path / f"out-{stored}"
        out = run([sys.executable, "handler.py", "--test_input", json.dumps(job)],
                  tiny_env | {"WAN_MODEL_ID": str(wan), "WAN_FP8": "1", "LOCAL_OUTPUT_DIR": str(out_dir)})
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        lines.append(re.search(r"Wan2.1 I2V loaded on .*", out.stdout + out.stderr)[0])
        frames.append(probe_mp4((out_dir / "local_test" / "video.mp4").read_bytes())["pixels"])
    assert "quantizing" not in lines[0], lines
    assert "fp8 True" in lines[0] and lines[0].endswith("transformer from transformer-fp8/)"), lines
    assert "quantizing" in lines[1] and "fp8 True" in lines[1] and lines[1].endswith("transformer from transformer/)")
    assert np.array_equal(frames[0], frames[1])


def test_a_compile_switch_without_a_compiler_says_so_in_one_line_and_serves(tiny_env, tmp_path):
    """An image without a C/C++ compiler (triton and inductor build kernels with one): start-up says once that
    WAN_COMPILE cannot work and why, and the worker serves the job eager instead of failing quietly."""
    job = {"input": {**VIDEO, "image_url": png_b64(64, 48), "height": 64, "width": 64, "num_frames": 5}}
    out = run([sys.executable, "handler.py", "--test_input", json.dumps(job)],
              tiny_env | {"WAN_COMPILE": "1", "CXX": str(tmp_path / "no-such-compiler"),
                          "LOCAL_OUTPUT_DIR": str(tmp_path)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    said = [line for line in log.splitlines() if "WAN_COMPILE is ignored" in line]
    assert len(said) == 1 and said[0].endswith(f"WAN_COMPILE is ignored on cpu: no compiler to build its kernels "
                                                f"({tmp_path / 'no-such-compiler'} not found; the image installs "
                                                f"gcc and g++)"), said
    assert "compile False" in log and "warm-up" not in log
    assert probe_mp4((tmp_path / "local_test" / "video.mp4").read_bytes())["frames"] == 5


def test_float8_attention_without_its_kernel_is_turned_off_with_one_reason():
    """On a Hopper GPU whose image lacks fa3-fwd (or a CUDA 12 image, which cannot load it), the plan turns
    WAN_FP8_ATTENTION off and says why; this machine has no fa3-fwd, which is what the check meets."""
    from plan import Device, decide
    from settings import load_settings

    plan = decide(load_settings({"WAN_FP8_ATTENTION": "1"}), Device("cuda", (9, 0), 141.0, 1))
    assert not plan.settings.wan_fp8_attention
    assert len(plan.notes) == 1 and plan.notes[0].startswith("WAN_FP8_ATTENTION is ignored on cuda: fa3-fwd does "
                                                             "not load (No module named 'fa3_fwd_interface')")
