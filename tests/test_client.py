"""examples/client.py as a user runs it: against the local API (`python handler.py --rp_serve_api` on the tiny
models), and against a stand-in for RunPod's /v2 API (the SDK's URL shape, progress, a bucket URL result)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT, png_b64
from media import probe_mp4
from PIL import Image
from werkzeug import Response

from video_utils import Mp4Stream


def client(args: list[str], job_input: dict, tmp_path: Path, env: dict[str, str] | None = None):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": job_input}))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_")} | (env or {})
    return subprocess.run([sys.executable, "examples/client.py", *args, "--input", str(job), "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_the_client_saves_a_video_and_an_image_from_the_local_api(api, tmp_path):
    video_job = {"mode": "video", "prompt": "a kite rises", "image_url": png_b64(), "height": 64, "width": 80,
                 "num_frames": 9, "fps": 8, "num_inference_steps": 2, "seed": 3}
    out = client(["--local", api.url], video_job, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    [video] = (tmp_path / "out").glob("*/video.mp4")
    assert f"saved {video}" in out.stdout and "COMPLETED" in out.stdout
    probed = probe_mp4(video.read_bytes())
    assert (probed["frames"], probed["fps"], probed["width"], probed["height"]) == (9, 8, 80, 64)

    image_job = {"prompt": "a lighthouse", "height": 128, "width": 136, "num_inference_steps": 2,
                 "refiner_inference_steps": 4, "seed": 1}
    out = client(["--local", api.url], image_job, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    [image] = (tmp_path / "out").glob("*/image-0.png")
    with Image.open(image) as png:
        assert (png.format, png.size) == ("PNG", (136, 128))


def test_a_failed_job_prints_its_error_and_exits_1(api, tmp_path):
    out = client(["--local", api.url], {"mode": "video", "prompt": "x", "image_url": png_b64(), "num_frames": 8},
                 tmp_path)
    assert out.returncode == 1
    assert "FAILED: Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got number 8." in out.stderr
    assert not (tmp_path / "out").exists()


def test_the_client_follows_runpods_api_and_downloads_a_bucket_url(httpserver, tmp_path):
    # RunPod's own API, as the SDK calls it: POST /v2/ID/run, GET /v2/ID/status/JOB with the key as a bearer token.
    with Mp4Stream(64, 48, 8) as stream:
        stream.write(np.zeros((5, 48, 64, 3), np.uint8))
        mp4 = stream.finish()
    states = iter([{"status": "IN_QUEUE"},
                   {"status": "IN_PROGRESS", "output": {"phase": "denoise", "step": 1, "total": 2}},
                   {"status": "COMPLETED", "output": {"video": httpserver.url_for("/bucket/video.mp4"), "seed": 7}}])
    auth = {"Authorization": "Bearer key-1"}
    httpserver.expect_request("/v2/ep-1/run", "POST", headers=auth).respond_with_json({"id": "job-1"})
    httpserver.expect_request("/v2/ep-1/status/job-1", "GET", headers=auth).respond_with_handler(
        lambda request: Response(json.dumps(next(states)), content_type="application/json"))
    httpserver.expect_request("/bucket/video.mp4").respond_with_data(mp4, content_type="video/mp4")
    out = client(["--endpoint", "ep-1"], {"mode": "video", "prompt": "x", "image_url": "https://example.com/x.png"},
                 tmp_path, {"RUNPOD_API_KEY": "key-1", "RUNPOD_ENDPOINT_BASE_URL": httpserver.url_for("/v2")})
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.splitlines()[:4] == ["job job-1 submitted", "IN_QUEUE", "IN_PROGRESS: denoise step 1/2",
                                           "COMPLETED"]
    assert (tmp_path / "out" / "job-1" / "video.mp4").read_bytes() == mp4
