"""Both modes end to end through handler(), on the tiny models, with real diffusers pipelines."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode_data_uri, png_b64, png_image
from media import probe_mp4
from PIL import Image

from jobs import fit_area
from model_handler import ModelHandler
from plan import plan_placement
from schemas import SCHEDULERS, WAN_NEGATIVE_PROMPT, validate_input

VIDEO = {"mode": "video", "prompt": "a cat walks", "height": 64, "width": 96, "num_frames": 9,
         "num_inference_steps": 2, "fps": 12, "seed": 7}
IMAGE = {"prompt": "a red car", "height": 128, "width": 192, "num_inference_steps": 4,
         "refiner_inference_steps": 5, "seed": 11}


def pngs(result: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(decode_data_uri(uri, "image/png"))) for uri in result["images"]]


def test_video_job_returns_an_mp4_with_the_requested_frames_fps_and_size(run_job):
    result = run_job({**VIDEO, "image_url": png_b64()})
    assert "error" not in result, result
    video = probe_mp4(decode_data_uri(result["video"], "video/mp4"))
    assert (video["frames"], video["fps"], video["width"], video["height"]) == (9, 12, 96, 64)
    assert video["codec"].startswith("h264") and video["pix_fmt"].startswith("yuv420p")
    assert video["boxes"].index("moov") < video["boxes"].index("mdat"), video["boxes"]  # plays while downloading
    assert {k: result[k] for k in ("seed", "width", "height", "num_frames", "fps", "duration_s")} == {
        "seed": 7, "width": 96, "height": 64, "num_frames": 9, "fps": 12, "duration_s": 0.75}
    assert set(result["timings"]) == {"fetch_s", "load_s", "inference_s", "encode_s"}
    assert all(v >= 0 for v in result["timings"].values())


def test_image_job_returns_pngs_of_the_requested_count_and_size(run_job):
    result = run_job({**IMAGE, "num_images": 2})
    assert "error" not in result, result
    images = pngs(result)
    assert [im.size for im in images] == [(192, 128)] * 2
    assert result["image_url"] == result["images"][0]
    assert result["seed"] == 11


def test_models_load_once_and_stay(run_job):
    run_job({**IMAGE, "num_inference_steps": 2})
    second = run_job({**IMAGE, "num_inference_steps": 2})
    assert second["timings"]["load_s"] == 0.0


def test_img2img_keeps_the_input_aspect_ratio_at_the_requested_area(run_job):
    result = run_job({"prompt": "", "image_url": "data:image/png;base64," + png_b64(200, 100), "height": 256,
                      "width": 256, "refiner_inference_steps": 10, "strength": 0.5, "seed": 1})
    assert "error" not in result, result
    # 2:1 input at 256x256 = 65536 pixels -> 360x176 (multiples of 8)
    assert [im.size for im in pngs(result)] == [(360, 176)]
    # At 128x128 the same input would give 176x88, a side below the 128 that images may have.
    small = run_job({"prompt": "", "image_url": png_b64(200, 100), "height": 128, "width": 128})
    assert small == {"error": "Field 'image_url' is a 200x100 image whose aspect ratio gives a 176x88 result; sides "
                              "from 128 to 2048 are allowed, so send a less elongated image or a larger height x "
                              "width."}
    big = run_job({"prompt": "", "image_url": png_b64(200, 100), "height": 2048, "width": 2048})
    assert big == {"error": "Field 'image_url' is a 200x100 image whose aspect ratio gives a 2896x1448 result; sides "
                            "from 128 to 2048 are allowed, so send a less elongated image or a smaller height x "
                            "width."}


def test_video_size_follows_the_image_aspect_ratio_when_not_given(run_job):
    job = {**VIDEO, "image_url": png_b64(320, 180), "num_frames": 5}
    del job["height"], job["width"]
    result = run_job(job)
    assert (result["width"], result["height"]) == (832, 464)
    video = probe_mp4(decode_data_uri(result["video"], "video/mp4"))
    assert (video["width"], video["height"], video["frames"]) == (832, 464, 5)


@pytest.mark.parametrize(("size", "expected"), [
    ((1280, 720), (832, 464)), ((1024, 1024), (624, 624)), ((1024, 768), (720, 544)), ((720, 1280), (464, 832)),
])
def test_derived_video_sizes_match_the_diffusers_recipe(size, expected):
    assert fit_area(*size, 480 * 832, 16) == expected


def test_same_seed_same_video_other_seed_other_video(run_job):
    job = {**VIDEO, "image_url": png_b64(seed=3)}
    first, again = run_job(job), run_job(job)
    other = run_job({**job, "seed": 8})
    frames = [probe_mp4(decode_data_uri(r["video"], "video/mp4"))["pixels"] for r in (first, again, other)]
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])


def test_same_seed_same_images_other_seed_other_images(run_job):
    first, again, other = run_job(IMAGE), run_job(IMAGE), run_job({**IMAGE, "seed": 12})
    arrays = [np.asarray(pngs(r)[0]) for r in (first, again, other)]
    assert np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], arrays[2])


def test_random_seed_is_returned_and_reproduces_the_output(run_job):
    job = {k: v for k, v in IMAGE.items() if k != "seed"}
    seeds = set()
    for _ in range(3):
        result = run_job({**job, "num_inference_steps": 2})
        assert 0 <= result["seed"] < 2**32
        seeds.add(result["seed"])
    assert len(seeds) == 3
    replay = run_job({**job, "num_inference_steps": 2, "seed": result["seed"]})
    assert np.array_equal(np.asarray(pngs(replay)[0]), np.asarray(pngs(result)[0]))


@contextmanager
def encoder_convolutions(vae: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the 3D convolutions the VAE's encoder runs while inside."""
    calls: list[int] = []
    convs = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    hooks = [conv.register_forward_hook(lambda *_: calls.append(1)) for conv in convs]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def test_video_frames_equal_a_plain_diffusers_call(run_job, tiny_env, tiny_models):
    """Parity: the worker adds nothing to what WanImageToVideoPipeline computes, though its VAE encoder skips
    the work that repeats over the condition video's black frames (33 frames: some layers settle)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    # An input of the video's aspect ratio: the worker's crop-to-fill is then a plain resize.
    with encoder_convolutions(tiny_models.model("video")[0].pipe.vae) as worker_convs:
        result = run_job({**VIDEO, "num_frames": 33, "image_url": png_b64(96, 64, seed=5), "flow_shift": 5.0})
    model_id = tiny_env["WAN_MODEL_ID"]
    pipe = WanImageToVideoPipeline.from_pretrained(
        model_id, vae=AutoencoderKLWan.from_pretrained(model_id, subfolder="vae", dtype=torch.float32),
        image_encoder=CLIPVisionModel.from_pretrained(model_id, subfolder="image_encoder", dtype=torch.float32),
        dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    with encoder_convolutions(pipe.vae) as plain_convs:
        frames = pipe(image=png_image(96, 64, seed=5), prompt="a cat walks", negative_prompt=WAN_NEGATIVE_PROMPT,
                      height=64, width=96, num_frames=33, num_inference_steps=2, guidance_scale=5.0,
                      generator=torch.Generator("cpu").manual_seed(7), output_type="np").frames[0]
    plain = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    worker_frames = probe_mp4(decode_data_uri(result["video"], "video/mp4"))["pixels"]
    # The worker's frames went through H.264 (lossy); compare against the same encode of the plain frames.
    from media import frames_to_mp4
    assert np.array_equal(worker_frames, probe_mp4(frames_to_mp4(plain, 12))["pixels"])
    assert len(worker_convs) < len(plain_convs) == 142, (len(worker_convs), len(plain_convs))


def test_the_mp4_encoder_gets_each_part_of_the_video_as_soon_as_the_vae_decodes_it(worker, tiny_models):
    """x264 works while the VAE decodes: the first frame, then four per latent frame, each passed on before
    the decoder makes the next part (the decoder's own calls are counted at each hand-over)."""
    wan, _ = tiny_models.model("video")
    job = validate_input({**VIDEO, "image_url": "-"}, worker.settings)
    decoder_calls, handed_over = [], []
    counter = wan.pipe.vae.decoder.register_forward_hook(lambda *_: decoder_calls.append(1))
    try:
        frames, _ = wan.generate(job, png_image(96, 64), on_frames=lambda f: handed_over.append(
            (len(decoder_calls), f.copy())))
    finally:
        counter.remove()
    assert [(calls, len(part)) for calls, part in handed_over] == [(1, 1), (2, 4), (3, 4)]
    # With VAE tiling on (the lowvram profile; its decoder would see tiles, not frames) no hook is set: the
    # pipeline's own output becomes uint8 and goes on in one piece. The streamed parts are those frames.
    wan.pipe.vae.enable_tiling()
    try:
        whole = []
        pipeline_frames, _ = wan.generate(job, png_image(96, 64), on_frames=whole.append)
    finally:
        wan.pipe.vae.disable_tiling()
    assert [len(part) for part in whole] == [9]
    assert frames.shape == (9, 64, 96, 3) and np.array_equal(np.concatenate([p for _, p in handed_over]),
                                                              pipeline_frames)


def _ffmpeg_children(pids: bool = False) -> list:
    """This process's child processes named ffmpeg-something, or their pids (/proc/<pid>/stat reads
    "pid (name) state ppid ...")."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        pid, name = head.split(" (", 1)
        if int(tail.split()[1]) == os.getpid() and "ffmpeg" in name:
            found.append(int(pid) if pids else name)
    return found


def _wait_for(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _job_failing_at_the_second_decoded_part(run_job, wan, fail) -> dict:
    """Runs a video job whose VAE decoder calls `fail` as it makes its second part of the video: the first
    part is with the MP4 encoder by then (waited for until ffmpeg runs)."""
    calls = []

    def second_part(*_):
        calls.append(1)
        if len(calls) == 2:
            assert _wait_for(_ffmpeg_children), "ffmpeg never started"
            fail()

    hook = wan.pipe.vae.decoder.register_forward_hook(second_part)
    try:
        return run_job({**VIDEO, "image_url": png_b64()})
    finally:
        hook.remove()


def test_a_job_failing_while_the_vae_decodes_leaves_no_encoder_running_and_the_next_job_succeeds(
        run_job, tiny_models):
    def decoder_breaks():
        raise RuntimeError("decoder broke")

    failed = _job_failing_at_the_second_decoded_part(run_job, tiny_models.model("video")[0], decoder_breaks)
    assert failed == {"error": "The job failed with an internal error (RuntimeError: decoder broke); "
                               "the worker is ready for the next job."}
    assert _ffmpeg_children() == []
    video = probe_mp4(decode_data_uri(run_job({**VIDEO, "image_url": png_b64()})["video"], "video/mp4"))
    assert video["frames"] == 9


def test_a_job_whose_mp4_encoder_dies_says_so_and_the_next_job_succeeds(run_job, tiny_models):
    def kill_ffmpeg():
        for pid in _ffmpeg_children(pids=True):
            os.kill(pid, signal.SIGKILL)

    failed = _job_failing_at_the_second_decoded_part(run_job, tiny_models.model("video")[0], kill_ffmpeg)
    assert failed == {"error": "The job failed with an internal error (OSError: the MP4 encoder (ffmpeg) was stopped "
                               "by SIGKILL); the worker is ready for the next job."}
    video = probe_mp4(decode_data_uri(run_job({**VIDEO, "image_url": png_b64()})["video"], "video/mp4"))
    assert video["frames"] == 9


def test_the_encoder_skipping_repeated_work_gives_the_same_latents_with_less_work(tiny_models):
    """The I2V condition (an image, then black frames) encoded by the worker's VAE with and without the
    skipping: the same latents, bit for bit, from fewer convolutions."""
    from models.vae import reused_encoder_work

    vae = tiny_models.model("video")[0].pipe.vae
    image = torch.from_numpy(np.asarray(png_image(64, 64), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    video = torch.cat([image[None, :, None], torch.zeros(1, 3, 32, 64, 64)], dim=2)
    with torch.no_grad():
        with encoder_convolutions(vae) as plain_convs:
            plain = vae.encode(video).latent_dist.mode()
        with reused_encoder_work(vae), encoder_convolutions(vae) as skipping_convs:
            skipping = vae.encode(video).latent_dist.mode()
    assert torch.equal(skipping, plain)
    assert len(skipping_convs) < len(plain_convs), (len(skipping_convs), len(plain_convs))


def test_images_equal_a_plain_sdxl_base_plus_refiner_call(run_job, tiny_env):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    result = run_job({**IMAGE, "guidance_scale": 6.0})
    vae = AutoencoderKL.from_pretrained(tiny_env["SDXL_VAE_ID"], dtype=torch.float32)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_env["SDXL_MODEL_ID"], vae=vae, variant="fp16",
                                                     dtype=torch.float32)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_env["SDXL_REFINER_ID"], vae=vae, text_encoder_2=base.text_encoder_2, variant="fp16", dtype=torch.float32)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    refiner.scheduler = DDIMScheduler.from_config(refiner.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(11)
    latents = base(prompt="a red car", height=128, width=192, num_inference_steps=4, denoising_end=0.8,
                   guidance_scale=6.0, output_type="latent", generator=generator).images
    image = refiner(prompt="a red car", image=latents, num_inference_steps=5, denoising_start=0.8,
                    guidance_scale=6.0, generator=generator).images[0]
    assert np.array_equal(np.asarray(pngs(result)[0]), np.asarray(image))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs_base_and_refiner(run_job, scheduler):
    result = run_job({**IMAGE, "scheduler": scheduler, "num_inference_steps": 5, "refiner_inference_steps": 5})
    assert "error" not in result, result
    assert pngs(result)[0].size == (192, 128)


def test_progress_is_posted_to_runpod_once_per_denoising_step(tiny_settings, tiny_models, monkeypatch):
    import dataclasses

    import runpod

    from worker import Worker

    posted = []
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda job, update: posted.append((job["id"], update)))
    on_runpod = Worker(dataclasses.replace(tiny_settings, on_runpod=True), tiny_models)
    on_runpod.run({"id": "v1", "input": {**VIDEO, "image_url": png_b64(), "num_inference_steps": 3}})
    assert posted == [("v1", {"phase": "denoise", "step": s, "total": 3}) for s in (1, 2, 3)]
    posted.clear()
    on_runpod.run({"id": "i1", "input": IMAGE})  # base: int(4 * 0.8) = 3 steps, refiner: 5 - int(5 * 0.8) = 1 step
    assert [(u["phase"], u["step"], u["total"]) for _, u in posted] == [
        ("base", 1, 4), ("base", 2, 4), ("base", 3, 4), ("refine", 4, 4)]


def test_out_of_memory_becomes_advice_and_the_next_job_succeeds(run_job, tiny_models, monkeypatch):
    """Fault injection on the real pipeline: the transformer raises CUDA OOM on its first call."""
    wan, _ = tiny_models.model("video")
    transformer = wan.pipe.transformer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformer, "forward", oom)
    result = run_job({**VIDEO, "image_url": png_b64()})
    assert result == {"error": "The GPU ran out of memory generating 9 frames of 96x64; ask for fewer frames or a "
                               "smaller size."}
    monkeypatch.undo()
    assert "video" in run_job({**VIDEO, "image_url": png_b64()})


def test_missing_weights_name_the_env_var_and_the_fetch_command(make_worker, tmp_path):
    worker = make_worker({"WAN_MODEL_ID": str(tmp_path / "nowhere")}, new_models=True)
    result = worker.run({"id": "x", "input": {**VIDEO, "image_url": png_b64()}})
    assert result == {"error": f"WAN_MODEL_ID='{tmp_path / 'nowhere'}' is not a model folder (no model_index.json "
                               f"or config.json in it); point WAN_MODEL_ID at a folder written by 'python "
                               f"download_weights.py --dir DIR', or at a hub id such as "
                               f"Wan-AI/Wan2.1-I2V-14B-480P-Diffusers."}
    (tmp_path / "nowhere").symlink_to(worker.settings.sdxl_model_id.replace("sdxl-base", "wan-i2v"))
    # The same worker serves the next job once the weights are there.
    assert "video" in worker.run({"id": "y", "input": {**VIDEO, "image_url": png_b64()}})


def test_importing_the_worker_loads_no_model(tiny_settings):
    import subprocess
    import sys
    from pathlib import Path

    # Had runpod.serverless.start run, it would have taken over the process (and read test_input.json).
    code = ("import gc, torch, handler, jobs, plan, errors, logs, model_handler, models.sdxl, models.wan, "
            "models.float8, models.vae, models.step_cache, models.compile_cache, schemas, settings, video_utils, "
            "storage, fetch, loras, parallel, download_weights; "
            "assert not [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize(("gpu_gib", "fp8", "keep_both", "profile"), [
    (80, False, True, "full"),      # H100: Wan (44) + SDXL (10.7) + headroom (16) fit
    (64, False, False, "full"),     # Wan fits alone; SDXL is parked while video runs
    (48, False, False, "offload"),  # L40S / A6000: diffusers model CPU offload
    (48, True, False, "full"),      # ... or float8 weights (29 GiB) resident
    (24, False, False, "lowvram"),  # RTX 4090: group offload with CUDA streams
    (24, True, False, "lowvram"),   # fp8 cannot help here: quantizing needs the bf16 transformer on the GPU
])
def test_placement_by_gpu_memory(gpu_gib, fp8, keep_both, profile):
    placement = plan_placement(gpu_gib, fp8=fp8)
    assert (placement.keep_both, placement.wan_profile) == (keep_both, profile)


def test_memory_profile_can_be_forced():
    assert plan_placement(80, profile="lowvram").wan_profile == "lowvram"


def test_cpu_runs_everything_in_float32(run_job, tiny_models: ModelHandler):
    run_job({**VIDEO, "image_url": png_b64(), "num_inference_steps": 1})
    run_job({**IMAGE, "num_inference_steps": 2})
    assert tiny_models.device.type == "cpu"
    wan, base = tiny_models.wan.pipe, tiny_models.sdxl.base
    assert {wan.transformer.dtype, wan.text_encoder.dtype, base.unet.dtype} == {torch.float32}


def _count_last_block_calls(models: ModelHandler):
    calls = []
    # A leaf inside the block: a cache hook may answer for the block (or its attention) without running it.
    handle = models.wan.pipe.transformer.blocks[-1].attn1.to_q.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kind", ["first_block", "taylorseer"])
def test_step_cache_skips_transformer_work_and_is_gone_after_the_job(run_job, tiny_models, kind):
    job = {**VIDEO, "image_url": png_b64(seed=9), "num_inference_steps": 8}
    plain = run_job(job)
    calls, handle = _count_last_block_calls(tiny_models)
    cached = run_job({**job, "step_cache": kind, "step_cache_threshold": 0.9})
    cached_calls = len(calls)
    calls.clear()
    after = run_job(job)
    handle.remove()
    assert "error" not in cached, cached
    assert cached_calls < len(calls) == 16  # 8 steps x (cond + uncond) without the cache
    decode = [probe_mp4(decode_data_uri(r["video"], "video/mp4"))["pixels"] for r in (plain, after)]
    assert np.array_equal(decode[0], decode[1])  # no cache state leaks into the next job


def test_a_cancelled_job_stops_within_one_step_and_the_next_job_succeeds(worker, tiny_models):
    """RunPod cancels the handler's task on a cancel or a timeout (JobScaler.stop_job: task.cancel())."""
    import asyncio

    wan, _ = tiny_models.model("video")
    calls: list[int] = []
    hook = wan.pipe.transformer.register_forward_hook(lambda *args: calls.append(1))
    job = {"id": "long", "input": {**VIDEO, "image_url": png_b64(), "num_inference_steps": 100}}

    async def cancel_after_two_steps() -> int:
        task = asyncio.create_task(worker.handle(job))
        while len(calls) < 4:  # two steps: cond + uncond each
            await asyncio.sleep(0.005)
        task.cancel()
        at_cancel = len(calls)
        with pytest.raises(asyncio.CancelledError):
            await task
        return at_cancel

    try:
        at_cancel = asyncio.run(cancel_after_two_steps())
    finally:
        hook.remove()
    assert len(calls) - at_cancel <= 2  # at most the step under way when the cancel came, of 100
    result = worker.run({"id": "next", "input": {**VIDEO, "image_url": png_b64()}})
    assert probe_mp4(decode_data_uri(result["video"], "video/mp4"))["frames"] == 9


def test_a_size_of_another_aspect_ratio_crops_the_input_instead_of_stretching_it():
    from video_utils import cover

    stripes = np.zeros((100, 300, 3), np.uint8)  # red | green | blue, side by side
    stripes[:, :100, 0] = stripes[:, 100:200, 1] = stripes[:, 200:, 2] = 255
    square = np.asarray(cover(Image.fromarray(stripes), 64, 64)).astype(int)
    assert square.shape == (64, 64, 3)
    inside = square[:, 3:-3]  # resampling blends the stripes' edges
    assert (inside[..., 1] > 250).all() and (inside[..., [0, 2]] < 5).all()  # only the middle third, unstretched
    wide = np.asarray(cover(Image.fromarray(stripes.transpose(1, 0, 2).copy()), 96, 32)).astype(int)
    assert wide.shape == (32, 96, 3) and (wide[3:-3, :, 1] > 250).all()


def test_video_jobs_call_cover_with_the_input_and_the_video_size(run_job, tiny_models, monkeypatch):
    import jobs

    given = []
    monkeypatch.setattr(jobs, "cover", lambda image, w, h: given.append((image.size, w, h)) or
                        image.resize((w, h)))
    result = run_job({**VIDEO, "image_url": png_b64(200, 100), "height": 64, "width": 64, "num_frames": 5})
    assert "error" not in result, result
    assert given == [((200, 100), 64, 64)]
