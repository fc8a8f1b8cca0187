"""`ModelHandler`: holds the worker's two models for the life of the process and keeps the one a job needs
on the GPU, as the plan's placement says (both resident, or the other one parked in CPU memory first).

Nothing loads at construction: a model loads on its first job, or at start-up (`start_up`) when
PRELOAD_MODELS names it or its compile switch is on (then it warms up with one real short job).
"""

from __future__ import annotations

import logging

import torch

from errors import first_line
from models.base import free_memory
from models.sdxl import SdxlModel
from models.wan import VideoModel, WanModel
from plan import Plan
from readahead import Reading

log = logging.getLogger("worker")


class ModelHandler:
    """The SDXL and Wan models of one worker process, placed on its device."""

    def __init__(self, plan: Plan, reading: dict[str, Reading] | None = None) -> None:
        self.plan, self.settings, self.placement = plan, plan.settings, plan.placement
        self.reading = reading or {}  # model name -> its weights being read ahead since the process started
        self.device = torch.device(plan.device.type)
        self.sdxl = SdxlModel(plan.settings, self.device)
        wan = WanModel(plan.settings, self.device, plan.placement)
        self.wan: VideoModel = wan
        if plan.settings.num_gpus > 1:  # one video over several GPUs, behind the same interface
            import parallel

            self.wan = parallel.start(plan, wan)

    def model(self, mode: str) -> tuple[SdxlModel | VideoModel, float]:
        """The mode's model, loaded and on the GPU (the other parked first if both do not fit); load seconds."""
        wanted, other = (self.sdxl, self.wan) if mode == "image" else (self.wan, self.sdxl)
        if (guessed := self.reading.get(other.name)) is not None and guessed.guess:
            guessed.stop(f"the first job is for {wanted.name}")  # the disk is this model's now
        if not self.placement.keep_both:
            other.park()  # first, so its memory is free before this one loads or moves in
        seconds = wanted.load()
        wanted.resident()
        return wanted, seconds

    def start_up(self) -> dict[str, float]:
        """Preload (PRELOAD_MODELS) and warm up compiled models; returns seconds per step.

        A failure logs one line and leaves the worker serving (eager, or loading on the first job):
        a worker that exits at boot is restarted by RunPod in a loop, and billed for it.
        """
        seconds: dict[str, float] = {}
        for mode, model in (("image", self.sdxl), ("video", self.wan)):
            name = model.name
            if not self.settings.loads_at_start(name):
                continue
            try:
                _, seconds[f"{name}_load_s"] = self.model(mode)
                if model.compiled:
                    seconds[f"{name}_warm_up_s"] = model.warm_up()
            except Exception as err:  # noqa: BLE001 - keep serving; each job then reports its own error
                log.error("start-up of %s failed, the worker keeps serving (%s: %s)", name, type(err).__name__,
                          first_line(err, 300))
                free_memory()
        return seconds
