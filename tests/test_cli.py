"""The local entry points a user types: `python handler.py --test_input ...` and the README's demo command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, png_b64
from media import probe_mp4


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_"))} | env
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_test_input_flag_runs_one_job_and_writes_the_video(tiny_env, tmp_path):
    job = {"input": {"mode": "video", "prompt": "leaves fall", "image_url": png_b64(), "height": 64, "width": 64,
                     "num_frames": 9, "num_inference_steps": 2, "fps": 24}}
    out = run([sys.executable, "handler.py", "--test_input", json.dumps(job)],
              tiny_env | {"LOCAL_OUTPUT_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    video = probe_mp4((tmp_path / "local_test" / "video.mp4").read_bytes())
    assert (video["frames"], video["fps"], video["width"], video["height"]) == (9, 24, 64, 64)
    assert "Job local_test completed successfully" in out.stdout
    # The log shows where the video went, not megabytes of base64.
    assert str(tmp_path / "local_test" / "video.mp4") in out.stdout
    assert not re.search(r"[A-Za-z0-9+/]{2000}", out.stdout + out.stderr)
    # A cold start's longest part begins first: the Wan files are read from the process start, before Python
    # has imported torch (no model loads at start-up, so this is a guess that the first job is a video, and it was).
    lines = [line.split(" worker: ", 1)[1] for line in out.stderr.splitlines() if " worker: " in line]
    assert re.fullmatch(r"reading Wan2.1 I2V ahead: [\d.]+ GB in 4 files of transformer, image_encoder, vae, "
                        r"text_encoder, from the process start \(as a guess that the first job is a video\)",
                        lines[0]), lines
    assert lines.index(next(x for x in lines if x.startswith("read Wan2.1 I2V ahead: "))) < \
        lines.index(next(x for x in lines if x.startswith("Wan2.1 I2V loaded on cpu")))


def test_test_input_flag_reports_a_bad_request_and_exits_nonzero(tiny_env, tmp_path):
    job = {"input": {"mode": "video", "prompt": "x", "image_url": png_b64(), "num_frames": 8}}
    out = run([sys.executable, "handler.py", "--test_input", json.dumps(job)], tiny_env)
    assert out.returncode == 1
    assert "Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got number 8." in out.stdout


def test_readme_demo_command_writes_a_playable_video(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "\nmake demo\n" in readme
    out = run(["make", "demo"], {"LOCAL_OUTPUT_DIR": str(tmp_path)}, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = json.loads((ROOT / "test_input.json").read_text())["input"]
    video = probe_mp4(Path(tmp_path / "local_test" / "video.mp4").read_bytes())
    # test_input.json's 4:3 picture -> 720x544 inside Wan's 480x832 area.
    assert (video["frames"], video["fps"], video["width"], video["height"]) == (job["num_frames"], 16, 720, 544)
    assert video["codec"].startswith("h264") and video["pix_fmt"].startswith("yuv420p")


def test_a_bad_setting_stops_the_start_with_one_line_and_exit_code_2(tiny_env):
    """A setting that cannot work, found while reading the settings or when the plan meets the device (several
    GPUs asked for on a machine without one, after the start-up read has begun): one line, exit code 2 (RunPod
    shows the worker as failed), and no wait for the weights being read ahead."""
    for bad, says in (({"MAX_INLINE_MB": "lots"}, "MAX_INLINE_MB"),
                      ({"NUM_GPUS": "2", "WAN_COMPILE": "1"}, "cannot be combined with WAN_COMPILE=1")):
        out = run([sys.executable, "handler.py"], tiny_env | bad, timeout=120)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if " ERROR " in line]
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert len(errors) == 1 and says in errors[0], errors
