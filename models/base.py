"""What the SDXL and Wan models share: LoRA switching, the warm-up through the compile cache, the
compile stance, the step callback, and the sentences for missing weights and GPU out-of-memory."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from errors import GenerationError, JobCancelled
from lora_source import LoraSpec
from loras import LoraCache, PipelineLoras
from models.compile_cache import CompileCache, cache_key, compile_seconds, lookups
from settings import Settings

log = logging.getLogger("worker")
LORA_FETCH_TIMEOUT_S = 600.0

Progress = Callable[[str, int, int], None]  # (phase, step, total)
Cancelled = Callable[[], bool]


class Model:
    """Settings, device, the job's LoRAs, and the warm-up that compiles before any user job."""

    name = ""  # "sdxl" / "wan": PRELOAD_MODELS and log lines
    compiled = False

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings, self.device = settings, device
        self.loras: PipelineLoras | None = None
        # Within a user job, code the warm-up did not compile runs eager rather than stalling for minutes
        # on a compile. Tests set "fail_on_recompile" to prove that a job ran compiled.
        self.stance = "eager_on_recompile"
        self._warming_up = False

    def _dtype(self, gpu_dtype: torch.dtype) -> torch.dtype:
        return gpu_dtype if self.device.type == "cuda" else torch.float32

    def _stance(self):
        return torch.compiler.set_stance(self.stance) if self.compiled and not self._warming_up else nullcontext()

    def _use_loras(self, specs: tuple[LoraSpec, ...], make: Callable[[], PipelineLoras], fuse: bool) -> float:
        """Make exactly the job's LoRAs active (none: all off); returns seconds spent."""
        if not specs and self.loras is None:
            return 0.0  # no LoRA ever loaded here: nothing to switch off
        start = time.perf_counter()
        self.loras = self.loras or make()
        self.loras.apply(list(specs), self.fetch_lora, fuse)
        return time.perf_counter() - start

    def fetch_lora(self, spec: LoraSpec) -> Path:
        """The LoRA's file on disk, downloaded into the LoRA cache first when it is not there."""
        s = self.settings
        return LoraCache(s.lora_cache_dir, s.lora_cache_bytes).fetch(spec, max_bytes=s.lora_max_bytes,
                                                                     timeout_s=LORA_FETCH_TIMEOUT_S)

    def warm_up(self) -> float:
        """Run one real, short job so that compilation happens before any user job.

        The compile cache (COMPILE_CACHE_DIR) is loaded first and written after, so that later workers
        of an endpoint skip the part of compiling that torch's cache artifacts hold.
        """
        cache = CompileCache(self.settings.compile_cache_dir, self.cache_key()) if self.compiled else None
        loaded = cache.load() if cache else False
        before, spent = lookups(), compile_seconds()
        start = time.perf_counter()
        self._warming_up = True
        try:
            self._warm_up_job()
        finally:
            self._warming_up = False
        seconds = time.perf_counter() - start
        written = cache.save() if cache and not loaded else False
        cached = (f" ({lookups()['fxgraph_cache_hit'] - before['fxgraph_cache_hit']} compiled graphs from the "
                  f"compile cache {cache.path})" if loaded else
                  f" (compiled; cache written to {cache.path})" if written else "")
        log.info("%s warm-up took %.1f s%s", self.name, seconds, cached)
        if self.compiled:  # where a compiling start spends its time, and what torch's caches held
            phases = {key: value - spent[key] for key, value in compile_seconds().items()}
            found = {key: count - before[key] for key, count in lookups().items()}
            log.info("%s compiling: %s; cache lookups: %s", self.name,
                     ", ".join(f"{key} {value:.1f}" for key, value in phases.items()),
                     ", ".join(f"{key} {count}" for key, count in found.items()))
        return seconds

    def _warm_up_job(self) -> None:
        raise NotImplementedError

    def cache_key(self) -> str:
        raise NotImplementedError

    def _key(self, *parts: Any) -> str:
        return cache_key(self.name, self.device, *parts)


class Stopwatch:
    """Seconds per named phase of loading (imports, weights, quantizing, ...), summed over its uses."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def summary(self, weight_bytes: int = 0) -> str:
        """'imports 2.0 s, weights 30.1 s (45.2 GB at 1.50 GB/s), ...' for the load's log line."""
        parts = []
        for phase, seconds in self.seconds.items():
            rate = (f" ({weight_bytes / 1e9:.2f} GB at {weight_bytes / 1e9 / seconds:.2f} GB/s)"
                    if phase == "weights" and weight_bytes and seconds > 0 else "")
            parts.append(f"{phase} {seconds:.1f} s{rate}")
        return ", ".join(parts)


def stored_bytes(model_id: str, subfolders: Iterable[str]) -> int:
    """Bytes of the weight files a load reads from a model folder (0 for a hub id: not known here)."""
    root = Path(model_id)
    return sum(f.stat().st_size for sub in subfolders if (root / sub).is_dir()
               for f in (root / sub).glob("*.safetensors"))


def step_callback(progress: Progress | None, phase: str, offset: int, total: int, cancelled: Cancelled | None,
                  on_step: Callable[[], None] | None = None):
    """diffusers' callback_on_step_end: the step-end hook (several GPUs), cancellation, then progress."""
    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if on_step is not None:
            on_step()
        if cancelled is not None and cancelled():
            raise JobCancelled(f"The job was cancelled after {phase} step {offset + step + 1} of {total}.")
        if progress is not None:
            progress(phase, offset + step + 1, total)
        return kwargs

    return callback


@contextmanager
def friendly_oom(what: str, advice: str) -> Iterator[None]:
    """CUDA out-of-memory -> a GenerationError saying what to ask for instead; frees the memory."""
    try:
        yield
    except torch.OutOfMemoryError:
        free_memory()
        raise GenerationError(f"The GPU ran out of memory generating {what}; ask for {advice}.") from None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
