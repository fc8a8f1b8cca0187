"""RunPod serverless entrypoint: validate the job input, run one image or video job, return the result.

    python handler.py                          # runs test_input.json once, writes outputs/ (local test)
    python handler.py --test_input '{"input": {...}}'
    python handler.py --rp_serve_api --rp_api_port 8000   # local /run, /runsync, /status API

Importing this module loads no model and starts nothing; `runpod.serverless.start` runs only
under __main__. Every failure becomes {"error": "<one sentence>"} and the worker goes on
serving: the pipelines keep no per-job state (a fresh scheduler and generator per job).
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import runpod
from runpod.serverless.modules.rp_logger import RunPodLogger

from loras import job_loras
from model_handler import GenerationError, ModelHandler, free_memory
from schemas import VIDEO_MAX_AREA, InputError, validate_input
from settings import Settings, SettingsError, load_settings
from storage import Artifact, DeliveryError, deliver
from video_utils import fit_area, frames_to_mp4, load_image_input, png_bytes

log = logging.getLogger("worker")
_settings: Settings | None = None
_models: ModelHandler | None = None


def configure(settings: Settings) -> ModelHandler:
    """Use these settings from now on; keeps already loaded models unless their locations changed."""
    global _settings, _models
    model_fields = ("sdxl_model_id", "sdxl_refiner_id", "sdxl_vae_id", "wan_model_id", "gpu_headroom_gib",
                    "memory_profile", "gpu_memory_gib", "wan_fp8", "wan_compile", "sdxl_compile", "sdxl_fuse_qkv",
                    "attention_backend", "wan_load_to_gpu", "wan_vae_dtype")
    if _models is None or any(getattr(_models.settings, f) != getattr(settings, f) for f in model_fields):
        _models = ModelHandler(settings)
    _models.settings = settings  # options read per job (LoRA cache, fusing) follow the new settings
    _settings = settings
    return _models


def _state() -> tuple[Settings, ModelHandler]:
    if _settings is None:
        configure(load_settings(os.environ))
    return _settings, _models


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler: one job in, one result dict (or {"error": sentence}) out."""
    try:
        params = validate_input(job.get("input"))
        settings, models = _state()
        if params["output"] == "s3" and settings.bucket is None:
            raise InputError("Field 'output' is 's3' but no bucket is configured (BUCKET_ENDPOINT_URL, "
                             "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY); ask for 'auto' or 'base64'.")
        run = _image_job if params["mode"] == "image" else _video_job
        return run(job, params, settings, models)
    except InputError as err:  # a refusal: no generation ran, so there is nothing to free
        return {"error": str(err)}
    except (GenerationError, DeliveryError) as err:
        free_memory()
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - the worker must answer every job and keep serving
        log.exception("job %s failed", job.get("id"))
        free_memory()
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        return {"error": f"The job failed with an internal error ({type(err).__name__}: {detail}); "
                         f"the worker is ready for the next job."}


def _progress(job: dict[str, Any], settings: Settings):
    def report(phase: str, step: int, total: int) -> None:
        update = {"phase": phase, "step": step, "total": total}
        if settings.on_runpod:
            runpod.serverless.progress_update(job, update)
        else:  # no RunPod API to post to locally: log instead
            log.info("job %s: %s step %d/%d", job.get("id"), phase, step, total)

    return report


def _load_input_image(p: dict[str, Any], settings: Settings):
    return load_image_input(p["image_url"], "image_url", max_bytes=settings.max_input_image_bytes,
                            max_pixels=settings.max_input_image_pixels, timeout_s=settings.fetch_timeout_s)


def _image_job(job: dict[str, Any], p: dict[str, Any], settings: Settings, models: ModelHandler) -> dict[str, Any]:
    job_loras(p, settings)  # refuse malformed LoRA paths before any work
    pixels = p["num_images"] * p["height"] * p["width"]
    if pixels > settings.max_image_pixels:
        raise InputError(f"Fields num_images x height x width ask for {pixels:,} pixels; this worker allows at "
                         f"most {settings.max_image_pixels:,} per job (MAX_IMAGE_PIXELS), so ask for fewer or "
                         f"smaller images.")
    init_image = None
    if p["image_url"] is not None:
        init_image = _load_input_image(p, settings)
        # img2img keeps the input's aspect ratio at the requested pixel count (multiples of 8 for the VAE).
        size = fit_area(init_image.width, init_image.height, p["width"] * p["height"], 8)
        init_image = init_image.resize(size)
        p["width"], p["height"] = size
    images, timings = models.generate_images(p, init_image, _progress(job, settings))
    start = time.perf_counter()
    artifacts = [Artifact(png_bytes(im), "image/png", f"image-{i}.png") for i, im in enumerate(images)]
    timings["encode_s"] = time.perf_counter() - start
    urls, warnings = _deliver(artifacts, job, p, settings, timings)
    result = {"images": urls, "image_url": urls[0], "seed": p["seed"], "timings": _rounded(timings)}
    return result | ({"warnings": warnings} if warnings else {})


def video_tokens(num_frames: int, height: int, width: int) -> int:
    """Transformer sequence length of a Wan2.1 job: latent frames x (H/16) x (W/16)."""
    return ((num_frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def _video_job(job: dict[str, Any], p: dict[str, Any], settings: Settings, models: ModelHandler) -> dict[str, Any]:
    if p["step_cache"] != "off" and settings.wan_compile:
        # The cache hooks wrap the transformer blocks, which torch.compile(fullgraph=True) cannot trace.
        raise InputError(f"Field 'step_cache' is {p['step_cache']!r}, but this worker runs with WAN_COMPILE=1, "
                         f"which step caching cannot be combined with; send 'off'.")
    job_loras(p, settings)  # refuse malformed LoRA paths (and preset "fast" without a LoRA) before any work
    if p["height"] is not None:
        _check_video_budget(p, settings)  # before fetching anything
    image = _load_input_image(p, settings)
    if p["height"] is None:
        p["width"], p["height"] = fit_area(image.width, image.height, VIDEO_MAX_AREA, 16)
        if not (64 <= p["width"] <= 1280 and 64 <= p["height"] <= 1280):
            raise InputError(f"Field 'image_url' is a {image.width}x{image.height} image whose aspect ratio gives a "
                             f"{p['width']}x{p['height']} video; sides from 64 to 1280 are allowed, so send height "
                             f"and width explicitly or a less elongated image.")
        _check_video_budget(p, settings)
    # As in diffusers' Wan I2V recipe: the first frame is the input resized to the video size.
    image = image.resize((p["width"], p["height"]))
    frames, timings = models.generate_video(p, image, _progress(job, settings))
    start = time.perf_counter()
    mp4 = frames_to_mp4(frames, p["fps"], preset=settings.mp4_preset)
    timings["encode_s"] = time.perf_counter() - start
    urls, warnings = _deliver([Artifact(mp4, "video/mp4", "video.mp4")], job, p, settings, timings)
    result = {"video": urls[0], "seed": p["seed"], "width": p["width"], "height": p["height"],
              "num_frames": p["num_frames"], "fps": p["fps"], "duration_s": round(p["num_frames"] / p["fps"], 3),
              "timings": _rounded(timings)}
    return result | ({"warnings": warnings} if warnings else {})


def _check_video_budget(p: dict[str, Any], settings: Settings) -> None:
    tokens = video_tokens(p["num_frames"], p["height"], p["width"])
    if tokens > settings.max_video_tokens:
        raise InputError(f"Fields num_frames={p['num_frames']}, height={p['height']}, width={p['width']} make "
                         f"{tokens:,} transformer tokens; this worker allows at most {settings.max_video_tokens:,} "
                         f"(MAX_VIDEO_TOKENS, about 1.5x a 480x832 81-frame video) to stay within GPU memory and "
                         f"time, so ask for fewer frames or a smaller size.")


def _deliver(artifacts: list[Artifact], job: dict[str, Any], p: dict[str, Any], settings: Settings,
             timings: dict[str, float]) -> tuple[list[str], list[str]]:
    start = time.perf_counter()
    urls, warnings = deliver(artifacts, str(job.get("id", "local")), settings.bucket, p["output"])
    if settings.bucket is not None and p["output"] != "base64":
        timings["upload_s"] = time.perf_counter() - start
    return urls, warnings


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}


# ---------------------------------------------------------------------------------------------
# Local runs: `python handler.py` / `--test_input` write the media to outputs/<job id>/ and log
# their paths instead of megabytes of base64.
# ---------------------------------------------------------------------------------------------
def save_outputs(result: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Write every inline data URI of a result to `directory`; returns the result with paths in their place."""
    directory.mkdir(parents=True, exist_ok=True)
    shown = dict(result)
    for field, name in (("video", "video.mp4"), ("images", None)):
        values = result.get(field)
        if values is None:
            continue
        for i, uri in enumerate([values] if isinstance(values, str) else values):
            if not uri.startswith("data:"):
                continue
            path = directory / (name or f"image-{i}.png")
            path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
            log.info("wrote %s", path)
            if isinstance(values, str):
                shown[field] = str(path)
            else:
                shown[field] = [*shown[field][:i], str(path), *shown[field][i + 1:]]
    if "images" in shown:
        shown["image_url"] = shown["images"][0]
    return shown


def _local_handler(job: dict[str, Any]) -> dict[str, Any]:
    result = handler(job)
    if "error" in result:
        return result
    return save_outputs(result, Path(_settings.local_output_dir) / str(job.get("id", "local")))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(os.environ)
    except SettingsError as err:
        log.error("%s", err)
        sys.exit(2)
    RunPodLogger().set_level(settings.runpod_log_level)
    models = configure(settings)
    log.info("worker settings: %s", settings)
    # With compilation on, the model loads and compiles at start-up so that no user job pays for it.
    modes = {"sdxl": "image", "wan": "video"}
    preload = set(settings.preload) | {name for name, mode in modes.items() if models.compiled(mode)}
    for name in sorted(preload):
        try:
            models.prepare(modes[name])  # parks the other model if both do not fit
            models.compile_now(modes[name])
        except GenerationError as err:  # keep serving: each job will report the same clear error
            log.error("preload of %s failed: %s", name, err)
    local_test = "--rp_serve_api" not in sys.argv and not settings.on_runpod
    runpod.serverless.start({"handler": _local_handler if local_test else handler})


if __name__ == "__main__":
    main()
