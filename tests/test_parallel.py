"""Several GPUs per worker (parallel.py), on CPU: NUM_GPUS=2 runs 2 gloo ranks on the tiny models.

The worker as RunPod runs it (`python handler.py --rp_serve_api` with NUM_GPUS=2) against the
single-process worker (conftest's `api`), and rank 0 in this process for what HTTP cannot show
(raw frames, cancellation, a failure on one rank only).
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import time

import numpy as np
import psutil
import pytest
from conftest import decode_data_uri, png_b64, png_image
from media import probe_mp4
from PIL import Image

import parallel
from errors import JobCancelled, ParallelError
from lora_source import LoraSpec
from model_handler import ModelHandler
from plan import Device, decide
from schemas import validate_input

IMAGE = "data:image/png;base64," + png_b64(96, 80)
# 80x80, 9 frames: 3 x 5 x 5 = 75 tokens, which do not split evenly over 2 ranks; 64x64, 5 frames: 32.
VIDEOS = [{"mode": "video", "prompt": "waves roll in", "image_url": IMAGE, "height": 80, "width": 80,
           "num_frames": 9, "num_inference_steps": 2, "seed": 5},
          {"mode": "video", "prompt": "a fox", "image_url": IMAGE, "height": 64, "width": 64, "num_frames": 5,
           "num_inference_steps": 2, "guidance_scale": 1.0, "seed": 6, "step_cache": "taylorseer"}]
SMALL_IMAGE = {"prompt": "a lighthouse", "height": 128, "width": 128, "num_inference_steps": 2,
               "refiner_inference_steps": 4, "seed": 1}


def followers_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "follower_main" in " ".join(p.cmdline())]


def test_start_up_refusals(tiny_settings):
    with pytest.raises(ParallelError) as err:
        decide(dataclasses.replace(tiny_settings, num_gpus=2, wan_compile=True))
    assert str(err.value) == ("NUM_GPUS=2 cannot be combined with WAN_COMPILE=1 yet (diffusers' context parallelism "
                              "does not support torch.compile); unset one of them.")
    two_gpus = Device("cuda", (9, 0), 80.0, 2)
    with pytest.raises(ParallelError) as err:
        decide(dataclasses.replace(tiny_settings, num_gpus=4), two_gpus)
    assert str(err.value) == ("NUM_GPUS is 4 but this machine has 2 GPU(s) visible; set NUM_GPUS to at most 2 (or "
                              "give the endpoint 4 GPUs per worker).")
    assert decide(dataclasses.replace(tiny_settings, num_gpus=2), two_gpus).settings.num_gpus == 2


def test_float8_wan_that_would_be_unloaded_for_image_jobs_is_refused(tiny_settings):
    """On a card that cannot hold float8 Wan beside SDXL, Wan is unloaded for an image job, and context
    parallelism could not be enabled again on rank 0 alone: refused before any follower starts."""
    settings = dataclasses.replace(tiny_settings, num_gpus=2, wan_fp8=True)
    with pytest.raises(ParallelError) as err:
        decide(settings, Device("cuda", (9, 0), 48.0, 2))  # 48 GB cards
    assert str(err.value) == ("NUM_GPUS=2 with WAN_FP8=1 needs GPUs that hold Wan and SDXL together (80 GB); unset "
                              "WAN_FP8 or give the endpoint larger GPUs.")
    assert not followers_of(os.getpid())  # refused at start-up, before any follower starts


def test_worker_refuses_to_start_with_an_impossible_setup(start_api):
    with pytest.raises(RuntimeError, match="API server exited with 2") as err:
        start_api({"NUM_GPUS": "2", "WAN_COMPILE": "1"})
    assert "NUM_GPUS=2 cannot be combined with WAN_COMPILE=1 yet" in str(err.value)


@pytest.fixture(scope="module")
def parallel_api(start_api):
    server = start_api({"NUM_GPUS": "2", "PRELOAD_MODELS": "wan"})  # loads on both ranks at start-up
    assert len(followers_of(server.proc.pid)) == 1
    return server


@pytest.mark.parametrize("job", VIDEOS, ids=["uneven-tokens", "taylorseer"])
def test_video_equals_single_process(api, parallel_api, job):
    one, two = api.runsync(job), parallel_api.runsync(job)
    assert one["status"] == two["status"] == "COMPLETED", (one, two)
    a, b = (decode_data_uri(r["output"]["video"], "video/mp4") for r in (one, two))
    assert a == b  # the same MP4, byte for byte (x264 is deterministic): the same frames went in
    assert np.array_equal(probe_mp4(a)["pixels"], probe_mp4(b)["pixels"])
    assert {k: v for k, v in two["output"].items() if k not in ("video", "timings")} == \
           {k: v for k, v in one["output"].items() if k not in ("video", "timings")}


def test_refusals_equal_single_process_and_next_job_runs(api, parallel_api):
    bad = [{**VIDEOS[0], "num_frames": 80},  # an invalid field
           {**VIDEOS[0], "height": 1280, "width": 1280, "num_frames": 161}]  # too many tokens
    for job in bad:
        one, two = api.runsync(job), parallel_api.runsync(job)
        assert one["status"] == two["status"] == "FAILED" and two["error"] == one["error"], (one, two)
    assert two["error"].startswith("Fields num_frames=161, height=1280, width=1280 make 262,400 transformer tokens")
    first_block = {**VIDEOS[1], "step_cache": "first_block"}
    assert api.runsync(first_block)["status"] == "COMPLETED"  # one process runs it; two cannot
    assert parallel_api.runsync(first_block)["error"] == (
        "Field 'step_cache' is 'first_block', which cannot run on this worker's 2 GPUs (each would decide alone "
        "which steps to skip); send 'off' or 'taylorseer'.")
    assert parallel_api.runsync(VIDEOS[0])["status"] == "COMPLETED"


def test_image_job_runs_on_rank_0(parallel_api):
    reply = parallel_api.runsync(SMALL_IMAGE)
    assert reply["status"] == "COMPLETED", reply
    image = Image.open(io.BytesIO(decode_data_uri(reply["output"]["image_url"], "image/png")))
    assert (image.format, image.size) == ("PNG", (128, 128))


def test_stopped_server_leaves_no_follower(parallel_api):
    followers = followers_of(parallel_api.proc.pid)
    parallel_api.stop()
    assert parallel_api.proc.returncode is not None
    gone, alive = psutil.wait_procs(followers, timeout=10)
    assert not alive, alive


def test_a_follower_that_crashes_ends_the_worker_and_leaves_its_stack_in_the_log(start_api):
    server = start_api({"NUM_GPUS": "2"})
    (follower,) = followers_of(server.proc.pid)
    follower.send_signal(signal.SIGSEGV)  # as a crash in native code would end it
    assert server.proc.wait(timeout=30) == 1  # RunPod restarts a worker that exits
    log = server.log()
    assert f"the GPU process of rank 1 (pid {follower.pid}) exited with code -11; exiting so that RunPod " \
           f"restarts the worker" in log
    assert "Fatal Python error: Segmentation fault" in log and "in follower_main" in log  # where it was


# ---------------------------------------------------------------- rank 0 in this process
@pytest.fixture(scope="module")
def ranks(tiny_settings):
    """A ModelHandler whose Wan runs on 2 ranks: this process (rank 0) and one follower."""
    models = ModelHandler(decide(dataclasses.replace(tiny_settings, num_gpus=2)))
    follower = models.wan._watchdog.followers[0]
    yield models
    models.wan.stop()
    assert follower.returncode == 0  # it exited on "stop", nothing left behind


def video_job(settings, **fields):
    """80x80, 9 frames (tokens split unevenly) unless fields say otherwise."""
    job = validate_input({**VIDEOS[0], "image_url": "-", **fields}, settings)
    return job, png_image(96, 80).resize((job.width, job.height))


def test_raw_frames_equal_single_process(ranks, tiny_models):
    job, image = video_job(ranks.settings)
    (wan, _), (single, _) = ranks.model("video"), tiny_models.model("video")
    frames, timings = wan.generate(job, image)
    assert frames.dtype == np.uint8 and np.array_equal(frames, single.generate(job, image)[0])
    assert "load_s" not in timings  # ModelHandler.model reported the load


def test_cancel_stops_every_rank_at_the_same_step(ranks, tiny_models):
    job, image = video_job(ranks.settings, num_inference_steps=3, height=64, width=64, num_frames=5)

    def cancel_at_second_check():
        calls.append(1)
        return len(calls) >= 2

    messages = []
    for model in (tiny_models.wan, ranks.wan):
        calls: list[int] = []
        with pytest.raises(JobCancelled) as err:
            model.generate(job, image, None, cancel_at_second_check)
        messages.append(str(err.value))
    assert messages[1] == messages[0] == "The job was cancelled after denoise step 2 of 3."
    assert ranks.wan.generate(job, image)[0].shape == (5, 64, 64, 3)  # every rank is ready for the next job


def test_failure_on_one_rank_before_the_transformer(ranks, monkeypatch, tmp_path):
    job, image = video_job(ranks.settings, height=64, width=64, num_frames=5)
    missing = LoraSpec("local", str(tmp_path / "gone.safetensors"), None, 1.0, "Field 'loras[0].path'",
                       "gone.safetensors")
    send = ranks.wan._send
    # The follower gets a LoRA file that does not exist; rank 0 runs the job as it came.
    monkeypatch.setattr(ranks.wan, "_send", lambda m: send(m[:1] + (dataclasses.replace(m[1], loras=(missing,)),)
                                                            + m[2:] if m[0] == "generate" else m))
    start = time.perf_counter()
    with pytest.raises(Exception) as err:
        ranks.wan.generate(job, image)
    assert str(err.value) == ("Field 'loras[0].path' names the LoRA gone.safetensors, which does not exist (or is not "
                              "a file).")
    assert time.perf_counter() - start < parallel.STEP_TIMEOUT_S
    monkeypatch.undo()
    # Rank 0 alone fails: the follower, already waiting at the transformer, stops too.
    monkeypatch.setattr(ranks.wan._inner, "_use_loras", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        ranks.wan.generate(job, image)
    monkeypatch.undo()
    assert ranks.wan.generate(job, image)[0].shape == (5, 64, 64, 3)
