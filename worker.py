"""The worker a RunPod process runs: `Worker.run` takes one job to its result, `build_worker` makes it.

A job reads: prepare (jobs.prepare: checked, image fetched and sized) -> generate -> encode ->
deliver. Every failure becomes {"error": "<one sentence>"} and the worker goes on serving: the
pipelines keep no per-job state. The handler RunPod calls (`Worker.handle`) is async, so that a job
RunPod cancels or times out stops at the end of the current denoising step instead of running to its
end. Importing this module loads no model and starts nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import logs
import readahead
from errors import DeliveryError, GenerationError, InputError, ResourceError, internal_error
from jobs import Ready, prepare
from model_handler import ModelHandler
from models.base import Cancelled, Progress, free_memory
from plan import decide, log_plan
from schemas import Job, VideoJob
from settings import Settings
from storage import Artifact, deliver, save_local
from video_utils import Mp4Stream, png_bytes

log = logging.getLogger("worker")


class Worker:
    """The settings and models of one worker process, and the job function RunPod calls."""

    def __init__(self, settings: Settings, models: ModelHandler) -> None:
        self.settings, self.models = settings, models
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")

    def run(self, job: dict[str, Any], cancelled: Cancelled | None = None) -> dict[str, Any]:
        """Run one job to its result dict, or {"error": sentence}."""
        try:
            ready = prepare(job.get("input"), self.settings)
            make = self._video if isinstance(ready.job, VideoJob) else self._image
            artifacts, timings = make(ready, self._progress(job), cancelled)
            urls, warnings, upload_s = deliver(artifacts, str(job.get("id", "local")), self.settings.bucket,
                                               ready.job.output, limit=self.settings.max_inline_chars)
            if upload_s is not None:
                timings["upload_s"] = upload_s
        except InputError as err:  # a refusal: no generation ran, so there is nothing to free
            return {"error": str(err)}
        except (GenerationError, DeliveryError, ResourceError) as err:
            free_memory()
            return {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - the worker must answer every job and keep serving
            log.exception("job %s failed", job.get("id"))
            free_memory()
            return {"error": internal_error(err)}
        return _result(ready.job, urls, timings, warnings)

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

    def _image(self, ready: Ready, progress: Progress, cancelled: Cancelled | None) -> tuple[list[Artifact], dict]:
        spec = ready.job
        model, load_s = self.models.model("image")
        images, generated = model.generate(spec, ready.image, progress, cancelled)
        start = time.perf_counter()
        artifacts = [Artifact(png_bytes(im), "image/png", f"image-{i}.png") for i, im in enumerate(images)]
        return artifacts, _fetched(ready) | {"load_s": load_s} | generated | {"encode_s": time.perf_counter() - start}

    def _video(self, ready: Ready, progress: Progress, cancelled: Cancelled | None) -> tuple[list[Artifact], dict]:
        spec = ready.job
        model, load_s = self.models.model("video")
        # x264 encodes the frames as the VAE decodes them; encode_s is what is left after the last one.
        with Mp4Stream(spec.width, spec.height, spec.fps, preset=self.settings.mp4_preset) as stream:
            _, generated = model.generate(spec, ready.image, progress, cancelled, stream.write)
            start = time.perf_counter()
            mp4 = stream.finish()
        timings = _fetched(ready) | {"load_s": load_s} | generated | {"encode_s": time.perf_counter() - start}
        return [Artifact(mp4, "video/mp4", "video.mp4")], timings

    def _progress(self, job: dict[str, Any]) -> Progress:
        def report(phase: str, step: int, total: int) -> None:
            update = {"phase": phase, "step": step, "total": total}
            if self.settings.on_runpod:
                import runpod

                runpod.serverless.progress_update(job, update)
            else:  # no RunPod API to post to locally: log instead
                log.info("job %s: %s step %d/%d", job.get("id"), phase, step, total)

        return report


def _fetched(ready: Ready) -> dict[str, float]:
    return {} if ready.fetch_s is None else {"fetch_s": ready.fetch_s}


def _result(job: Job, urls: list[str], timings: dict[str, float], warnings: list[str]) -> dict[str, Any]:
    """What the user gets back: the media (URLs or data URIs), what was made, and where the time went."""
    if isinstance(job, VideoJob):
        result = {"video": urls[0], "seed": job.seed, "width": job.width, "height": job.height,
                  "num_frames": job.num_frames, "fps": job.fps, "duration_s": round(job.num_frames / job.fps, 3)}
    else:
        result = {"images": urls, "image_url": urls[0], "seed": job.seed}
    result["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return result | ({"warnings": warnings} if warnings else {})


def local_handler(worker: Worker):
    """`python handler.py` / `--test_input`: the media go to outputs/<job id>/, the log shows their paths."""
    async def handle(job: dict[str, Any]) -> dict[str, Any]:
        result = await worker.handle(job)
        if "error" in result:
            return result
        return save_local(result, worker.settings.local_output_dir, str(job.get("id", "local")))

    return handle


def build_worker(settings: Settings, reading: dict[str, readahead.Reading] | None = None) -> Worker:
    """What a worker process builds at start: the plan (each switch decided once, one log line for each one
    turned off), the models (nothing loads yet; `reading`: the weights read ahead since the process started),
    quiet third-party logs and, with NUM_GPUS above 1, one process per further GPU. Raises SettingsError for a
    setup that cannot run."""
    plan, reading = decide(settings), reading or {}
    log_plan(plan)
    readahead.revise(reading, plan.settings)
    logs.quiet_third_party()
    return Worker(plan.settings, ModelHandler(plan, reading))
