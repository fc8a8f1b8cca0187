"""Both modes end to end through handler(), on the tiny models, with real diffusers pipelines."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import decode_data_uri, png_b64, png_image
from PIL import Image

import handler as worker
from model_handler import ModelHandler, plan_placement
from schemas import SCHEDULERS, WAN_NEGATIVE_PROMPT
from video_utils import fit_area, probe_mp4

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
    assert set(result["timings"]) == {"load_s", "inference_s", "encode_s"}
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
    result = run_job({"prompt": "", "image_url": "data:image/png;base64," + png_b64(200, 100), "height": 128,
                      "width": 128, "refiner_inference_steps": 10, "strength": 0.5, "seed": 1})
    assert "error" not in result, result
    # 2:1 input at 128x128 = 16384 pixels -> 176x88 (multiples of 8)
    assert [im.size for im in pngs(result)] == [(176, 88)]


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


def test_video_frames_equal_a_plain_diffusers_call(run_job, tiny_env):
    """Parity: the worker adds nothing to what WanImageToVideoPipeline computes."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    result = run_job({**VIDEO, "image_url": png_b64(seed=5), "flow_shift": 5.0})
    model_id = tiny_env["WAN_MODEL_ID"]
    pipe = WanImageToVideoPipeline.from_pretrained(
        model_id, vae=AutoencoderKLWan.from_pretrained(model_id, subfolder="vae", dtype=torch.float32),
        image_encoder=CLIPVisionModel.from_pretrained(model_id, subfolder="image_encoder", dtype=torch.float32),
        dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    frames = pipe(image=png_image(seed=5).resize((96, 64)), prompt="a cat walks", negative_prompt=WAN_NEGATIVE_PROMPT,
                  height=64, width=96, num_frames=9, num_inference_steps=2, guidance_scale=5.0,
                  generator=torch.Generator("cpu").manual_seed(7), output_type="np").frames[0]
    plain = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    worker_frames = probe_mp4(decode_data_uri(result["video"], "video/mp4"))["pixels"]
    # The worker's frames went through H.264 (lossy); compare against the same encode of the plain frames.
    from video_utils import frames_to_mp4
    assert np.array_equal(worker_frames, probe_mp4(frames_to_mp4(plain, 12))["pixels"])


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


def test_progress_is_posted_to_runpod_once_per_denoising_step(run_job, tiny_settings, monkeypatch):
    import dataclasses

    import runpod

    posted = []
    monkeypatch.setattr(runpod.serverless, "progress_update", lambda job, update: posted.append((job["id"], update)))
    worker.configure(dataclasses.replace(tiny_settings, on_runpod=True))
    run_job({**VIDEO, "image_url": png_b64(), "num_inference_steps": 3}, job_id="v1")
    assert posted == [("v1", {"phase": "denoise", "step": s, "total": 3}) for s in (1, 2, 3)]
    posted.clear()
    run_job(IMAGE, job_id="i1")  # base: int(4 * 0.8) = 3 steps, refiner: 5 - int(5 * 0.8) = 1 step
    assert [(u["phase"], u["step"], u["total"]) for _, u in posted] == [
        ("base", 1, 4), ("base", 2, 4), ("base", 3, 4), ("refine", 4, 4)]


def test_out_of_memory_becomes_advice_and_the_next_job_succeeds(run_job, monkeypatch):
    """Fault injection on the real pipeline: the transformer raises CUDA OOM on its first call."""
    models = worker._state()[1]
    models.load_wan()
    transformer = models.wan.transformer

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(transformer, "forward", oom)
    result = run_job({**VIDEO, "image_url": png_b64()})
    assert result == {"error": "The GPU ran out of memory generating 9 frames of 96x64; ask for fewer frames or a "
                               "smaller size."}
    monkeypatch.undo()
    assert "video" in run_job({**VIDEO, "image_url": png_b64()})


def test_missing_weights_name_the_env_var_and_the_fetch_command(tiny_settings, tmp_path):
    import dataclasses

    worker.configure(dataclasses.replace(tiny_settings, wan_model_id=str(tmp_path / "nowhere")))
    result = worker.handler({"id": "x", "input": {**VIDEO, "image_url": png_b64()}})
    assert result == {"error": f"Model weights for WAN_MODEL_ID='{tmp_path / 'nowhere'}' are not available locally; "
                               f"fetch them with 'python download_weights.py --only wan' or point WAN_MODEL_ID at "
                               f"a model folder."}
    worker.configure(tiny_settings)
    assert "video" in worker.handler({"id": "y", "input": {**VIDEO, "image_url": png_b64()}})


def test_importing_the_worker_loads_no_model(tiny_settings):
    import subprocess
    import sys

    # Had runpod.serverless.start run, it would have taken over the process (and read test_input.json).
    code = ("import gc, torch, handler, model_handler, schemas, video_utils, storage, download_weights; "
            "assert handler._models is None; "
            "assert not [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=worker.__file__.rsplit("/", 1)[0], capture_output=True,
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
    placement = plan_placement(gpu_gib, headroom_gib=16, fp8=fp8)
    assert (placement.keep_both, placement.wan_profile) == (keep_both, profile)


def test_memory_profile_can_be_forced():
    assert plan_placement(80, headroom_gib=16, profile="lowvram").wan_profile == "lowvram"


def test_cpu_runs_everything_in_float32(run_job):
    models: ModelHandler = worker._state()[1]
    run_job({**VIDEO, "image_url": png_b64(), "num_inference_steps": 1})
    run_job({**IMAGE, "num_inference_steps": 2})
    assert models.device.type == "cpu"
    assert {models.wan.transformer.dtype, models.wan.text_encoder.dtype, models.base.unet.dtype} == {torch.float32}


def _count_last_block_calls(models: ModelHandler):
    calls = []
    # A leaf inside the block: a cache hook may answer for the block (or its attention) without running it.
    handle = models.wan.transformer.blocks[-1].attn1.to_q.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("kind", ["first_block", "taylorseer"])
def test_step_cache_skips_transformer_work_and_is_gone_after_the_job(run_job, kind):
    job = {**VIDEO, "image_url": png_b64(seed=9), "num_inference_steps": 8}
    plain = run_job(job)
    models = worker._state()[1]
    calls, handle = _count_last_block_calls(models)
    cached = run_job({**job, "step_cache": kind, "step_cache_threshold": 0.9})
    cached_calls = len(calls)
    calls.clear()
    after = run_job(job)
    handle.remove()
    assert "error" not in cached, cached
    assert cached_calls < len(calls) == 16  # 8 steps x (cond + uncond) without the cache
    decode = [probe_mp4(decode_data_uri(r["video"], "video/mp4"))["pixels"] for r in (plain, after)]
    assert np.array_equal(decode[0], decode[1])  # no cache state leaks into the next job


def test_every_switch_that_runs_on_cpu_turned_on(tiny_env):
    """Compilation, fused QKV, LoRA fusing, an explicit attention backend, the bf16 VAE, another x264
    preset and the memory settings (which a CPU ignores), plus float8 (ignored without an Ada/Hopper
    GPU): both modes still work."""
    from settings import load_settings

    settings = load_settings(tiny_env | {
        "WAN_COMPILE": "1", "SDXL_COMPILE": "1", "SDXL_FUSE_QKV": "1", "LORA_FUSE": "1", "WAN_FP8": "1",
        "ATTENTION_BACKEND": "native", "MEMORY_PROFILE": "lowvram", "GPU_MEMORY_GIB": "24",
        "WAN_VAE_DTYPE": "bfloat16", "MP4_PRESET": "ultrafast"})
    worker.configure(settings)
    try:
        refused = worker.handler({"id": "c", "input": {**VIDEO, "image_url": png_b64(), "step_cache": "first_block"}})
        assert refused == {"error": "Field 'step_cache' is 'first_block', but this worker runs with WAN_COMPILE=1, "
                                    "which step caching cannot be combined with; send 'off'."}
        video = worker.handler({"id": "v", "input": {**VIDEO, "image_url": png_b64()}})
        assert "error" not in video, video
        assert probe_mp4(decode_data_uri(video["video"], "video/mp4"))["frames"] == 9
        image = worker.handler({"id": "i", "input": {**IMAGE, "num_inference_steps": 2}})
        assert [im.size for im in pngs(image)] == [(192, 128)], image
    finally:
        worker.configure(load_settings(tiny_env))
