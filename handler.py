"""RunPod serverless entrypoint: one job in, images or an MP4 out.

    python handler.py                          # runs test_input.json once, writes outputs/ (local test)
    python handler.py --test_input '{"input": {...}}'
    python handler.py --rp_serve_api --rp_api_port 8000   # local /run, /runsync, /status API

A job reads: validate -> fetch the input image -> generate -> encode -> deliver. Every failure
becomes {"error": "<one sentence>"} and the worker goes on serving: the pipelines keep no
per-job state. The handler RunPod calls is async, so that a job RunPod cancels or times out
stops at the end of the current denoising step instead of running to its end. Importing this
module loads no model and starts nothing; `runpod.serverless.start` runs only under __main__.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any

from model_handler import Cancelled, GenerationError, ModelHandler, free_memory
from schemas import ImageJob, InputError, ResourceError, VideoJob, size_image_job, size_video_job, validate_input
from settings import Settings, SettingsError, load_settings
from storage import Artifact, DeliveryError, PayloadFilter, check_folders, deliver, save_local
from video_utils import Mp4Stream, cover, load_image_input, png_bytes, remove_leftovers

log = logging.getLogger("worker")


class Worker:
    """The settings and models of one worker process, and the job function RunPod calls."""

    def __init__(self, settings: Settings, models: ModelHandler) -> None:
        self.settings, self.models = settings, models
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")

    def run(self, job: dict[str, Any], cancelled: Cancelled | None = None) -> dict[str, Any]:
        """Run one job to its result dict, or {"error": sentence}."""
        try:
            spec = validate_input(job.get("input"), self.settings)
            if isinstance(spec, VideoJob):
                return self._video(job, spec, cancelled)
            return self._image(job, spec, cancelled)
        except InputError as err:  # a refusal: no generation ran, so there is nothing to free
            return {"error": str(err)}
        except (GenerationError, DeliveryError, ResourceError) as err:
            free_memory()
            return {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - the worker must answer every job and keep serving
            log.exception("job %s failed", job.get("id"))
            free_memory()
            detail = str(err).splitlines()[0][:200] if str(err) else ""
            return {"error": f"The job failed with an internal error ({type(err).__name__}: {detail}); "
                             f"the worker is ready for the next job."}

    def start_up(self) -> dict[str, float]:
        """Preloads and warm-ups, on the thread that runs the jobs: CUDA graphs are recorded per thread."""
        return self._thread.submit(self.models.start_up).result()

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """The RunPod handler. RunPod cancels this task on a cancel or a timeout: the job stops within one step."""
        stop = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._thread, self.run, job, stop.is_set)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            log.info("job %s cancelled: stopping at the end of the current step", job.get("id"))
            await asyncio.wait([future])  # the GPU is free again before the next job starts
            raise

    def _image(self, job: dict[str, Any], spec: ImageJob, cancelled: Cancelled | None) -> dict[str, Any]:
        start = time.perf_counter()
        init_image = None
        if spec.image_url is not None:
            init_image = self._fetch(spec.image_url)
            spec = size_image_job(spec, init_image.size)
            init_image = init_image.resize((spec.width, spec.height))
        timings = {"fetch_s": time.perf_counter() - start} if init_image else {}
        model, timings["load_s"] = self.models.model("image")
        images, generated = model.generate(spec, init_image, self._progress(job), cancelled)
        start = time.perf_counter()
        artifacts = [Artifact(png_bytes(im), "image/png", f"image-{i}.png") for i, im in enumerate(images)]
        timings |= generated | {"encode_s": time.perf_counter() - start}
        urls, warnings = self._deliver(artifacts, job, spec, timings)
        result = {"images": urls, "image_url": urls[0], "seed": spec.seed, "timings": _rounded(timings)}
        return result | ({"warnings": warnings} if warnings else {})

    def _video(self, job: dict[str, Any], spec: VideoJob, cancelled: Cancelled | None) -> dict[str, Any]:
        start = time.perf_counter()
        image = self._fetch(spec.image_url)
        spec = size_video_job(spec, image.size, self.settings)
        # The first frame is the input scaled and center-cropped to the video's size, never stretched.
        image = cover(image, spec.width, spec.height)
        timings = {"fetch_s": time.perf_counter() - start}
        model, timings["load_s"] = self.models.model("video")
        # x264 encodes the frames as the VAE decodes them; encode_s is what is left after the last one.
        with Mp4Stream(spec.width, spec.height, spec.fps, preset=self.settings.mp4_preset) as stream:
            _, generated = model.generate(spec, image, self._progress(job), cancelled, stream.write)
            start = time.perf_counter()
            mp4 = stream.finish()
        timings |= generated | {"encode_s": time.perf_counter() - start}
        urls, warnings = self._deliver([Artifact(mp4, "video/mp4", "video.mp4")], job, spec, timings)
        result = {"video": urls[0], "seed": spec.seed, "width": spec.width, "height": spec.height,
                  "num_frames": spec.num_frames, "fps": spec.fps, "duration_s": round(spec.num_frames / spec.fps, 3),
                  "timings": _rounded(timings)}
        return result | ({"warnings": warnings} if warnings else {})

    def _fetch(self, value: str):
        s = self.settings
        return load_image_input(value, "image_url", max_bytes=s.max_input_image_bytes,
                                max_pixels=s.max_input_image_pixels, timeout_s=s.fetch_timeout_s)

    def _progress(self, job: dict[str, Any]):
        def report(phase: str, step: int, total: int) -> None:
            update = {"phase": phase, "step": step, "total": total}
            if self.settings.on_runpod:
                import runpod

                runpod.serverless.progress_update(job, update)
            else:  # no RunPod API to post to locally: log instead
                log.info("job %s: %s step %d/%d", job.get("id"), phase, step, total)

        return report

    def _deliver(self, artifacts: list[Artifact], job: dict[str, Any], spec: ImageJob | VideoJob,
                 timings: dict[str, float]) -> tuple[list[str], list[str]]:
        start = time.perf_counter()
        urls, warnings = deliver(artifacts, str(job.get("id", "local")), self.settings.bucket, spec.output,
                                 limit=self.settings.max_inline_chars)
        if self.settings.bucket is not None and spec.output != "base64":
            timings["upload_s"] = time.perf_counter() - start
        return urls, warnings


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}


def local_handler(worker: Worker):
    async def handle(job: dict[str, Any]) -> dict[str, Any]:
        result = await worker.handle(job)
        if "error" in result:
            return result
        return save_local(result, worker.settings.local_output_dir, str(job.get("id", "local")))

    return handle


def quiet_third_party(uses_torchao: bool) -> None:
    """Keep third-party notices that read like failures out of the worker's log; the worker's own lines stay.

    Called before diffusers or transformers is imported; `uses_torchao`: WAN_FP8 applies (WanModel.fp8).
    """
    if not uses_torchao:
        # torchao serves WAN_FP8 only, yet transformers' and diffusers' quantizer registries import it
        # whenever it is installed, and it then reports its optional kernels as "Failed to load".
        sys.modules.setdefault("torchao", None)
    for name in ("torchao", "torch.utils._pytree"):  # the same notices when WAN_FP8 does use it
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging
    import transformers.utils.logging

    # Known-harmless notices: the CLIP image processor's PIL fallback without torchvision (the PIL one is what
    # the model card's preprocessing uses) and diffusers' note on torchao checkpoints (none are loaded here).
    harmless = ("requires torchvision", "Unable to import `torchao` Tensor objects")
    handlers = list(logging.getLogger().handlers)  # transformers also propagates to these when CI=1 is set
    for library, name in ((diffusers.utils.logging, "diffusers"), (transformers.utils.logging, "transformers")):
        library.disable_progress_bar()  # per-file "Loading weights" bars: noise in a worker's log
        handlers += library.get_logger(name).handlers
    for handler in handlers:
        handler.addFilter(lambda record: not any(text in record.getMessage() for text in harmless))
    # Python 3.12 flags escape sequences in torchao's docstrings when it compiles them (no .pyc yet).
    warnings.filterwarnings("ignore", category=SyntaxWarning)


def build_worker(settings: Settings) -> Worker:
    """What a worker process builds at start: the models (nothing loads yet), quiet third-party logs and, with
    NUM_GPUS above 1, one process per further GPU. Raises SettingsError for a setup that cannot run."""
    models = ModelHandler(settings)
    quiet_third_party(uses_torchao=models.wan.fp8)
    if settings.num_gpus > 1:
        import parallel

        parallel.start(settings, models)
    return Worker(settings, models)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.addFilter(PayloadFilter())
    try:
        settings = load_settings(os.environ)
        log.info("worker settings: %s", settings.summary())
        worker = build_worker(settings)
    except SettingsError as err:  # parallel.ParallelError too
        log.error("%s", err)
        sys.exit(2)
    local_test = "--rp_serve_api" not in sys.argv and not settings.on_runpod
    remove_leftovers()
    for problem in check_folders(settings, local_outputs=local_test):
        log.warning("%s", problem)
    import runpod
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(settings.runpod_log_level)
    worker.start_up()
    runpod.serverless.start({"handler": local_handler(worker) if local_test else worker.handle})


if __name__ == "__main__":
    main()
