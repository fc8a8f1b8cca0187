"""What this worker runs with: the settings decided once against the device it found.

`decide(settings, device)` is called once at start-up. It returns a `Plan`: the settings with
every switch that cannot work here turned off (the job check and the models read only these),
where the models live on the GPU (`Placement`), and one sentence per switch it turned off,
which start-up logs once. A configuration that cannot run at all raises `SettingsError` (or
its kind `ParallelError`), and the worker stops before taking a job. Pure apart from
`Device.find()` and the two checks that need the machine (a compiler for torch.compile, the
float8 attention kernel), so tests call it with any device they describe.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from errors import InputError, ParallelError, SettingsError
from settings import Settings

log = logging.getLogger("worker")
# Weights in GPU memory: Wan in model-card dtypes (float8 block linears with WAN_FP8), SDXL base + refiner in fp16.
WAN_WEIGHTS_GIB = 44.0
WAN_FP8_WEIGHTS_GIB = 29.0
SDXL_WEIGHTS_GIB = 10.7
HEADROOM_GIB = 16.0  # GPU memory kept free for activations when deciding what stays resident
OFFLOAD_MIN_GIB = 40.0  # smallest card for "offload": the bf16 transformer (30.5 GiB) alone plus activations


@dataclass(frozen=True)
class Device:
    """The accelerator start-up found (or the CPU), as far as the decisions need it."""

    type: str = "cpu"  # "cuda" | "cpu"
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability
    memory_gib: float = 0.0
    count: int = 0  # GPUs visible to this process

    @classmethod
    def find(cls) -> Device:
        import torch

        if not torch.cuda.is_available():
            return cls()
        return cls("cuda", torch.cuda.get_device_capability(0),
                   torch.cuda.get_device_properties(0).total_memory / 1024**3, torch.cuda.device_count())


@dataclass(frozen=True)
class Placement:
    """Where each model lives while a job of one mode runs on a GPU."""

    keep_both: bool  # SDXL and Wan may both stay on the GPU
    wan_profile: str  # full: all resident | offload: model CPU offload | lowvram: group offload


@dataclass(frozen=True)
class Plan:
    settings: Settings  # as decided: a switch that cannot work here is off
    device: Device
    placement: Placement
    notes: tuple[str, ...] = ()  # one sentence per switch turned off, logged once at start-up


def plan_placement(gpu_total_gib: float, profile: str = "auto", fp8: bool = False) -> Placement:
    """Decide residency from the GPU's memory; pure so it can be checked for any card size."""
    wan_gib = WAN_FP8_WEIGHTS_GIB if fp8 else WAN_WEIGHTS_GIB
    if profile == "auto":
        profile = ("full" if gpu_total_gib >= wan_gib + HEADROOM_GIB else
                   "offload" if gpu_total_gib >= OFFLOAD_MIN_GIB else "lowvram")
    keep_both = profile == "full" and gpu_total_gib >= wan_gib + SDXL_WEIGHTS_GIB + HEADROOM_GIB
    return Placement(keep_both=keep_both, wan_profile=profile)


def decide(settings: Settings, device: Device | None = None) -> Plan:
    """The plan for this worker; raises SettingsError for a configuration that cannot run."""
    device = device or Device.find()
    placement = (plan_placement(device.memory_gib, settings.memory_profile, settings.wan_fp8)
                 if device.type == "cuda" else Placement(keep_both=True, wan_profile="full"))
    _check_fast_lora(settings)
    off = {name: why for name, why in (("wan_fp8", _fp8_unusable(settings, device, placement)),
                                       ("wan_fp8_attention", _fp8_attention_unusable(settings, device)),
                                       ("wan_compile", settings.wan_compile and _no_compiler(device)),
                                       ("sdxl_compile", settings.sdxl_compile and _no_compiler(device))) if why}
    notes = tuple(f"{name.upper()} is ignored on {device.type}: {why}" for name, why in off.items())
    decided = dataclasses.replace(settings, **dict.fromkeys(off, False))
    if "wan_fp8" in off and device.type == "cuda":  # the bf16 weights need room that float8 would have saved
        placement = plan_placement(device.memory_gib, settings.memory_profile, fp8=False)
    if decided.num_gpus > 1:
        _check_parallel(decided, device, placement)
    return Plan(decided, device, placement, notes)


def _check_fast_lora(settings: Settings) -> None:
    from lora_source import parse_source

    if settings.wan_fast_lora:
        try:
            parse_source(settings.wan_fast_lora, "WAN_FAST_LORA", settings.lora_roots)
        except InputError as err:
            raise SettingsError(str(err)) from None


def _fp8_unusable(settings: Settings, device: Device, placement: Placement) -> str | None:
    if not settings.wan_fp8:
        return None
    if device.type == "cuda" and device.capability < (8, 9):
        return "float8 matmuls need a GPU of compute capability 8.9+ (Ada, Hopper)"
    # On CPU torch._scaled_mm has a kernel of its own: no speed-up, but the tests run the same float8 layers.
    if placement.wan_profile != "full":
        # Model and group offload move the weights at every job; float8 is measured resident only.
        return f"float8 weights stay on the GPU, and the {placement.wan_profile} profile moves them"
    return None


def _fp8_attention_unusable(settings: Settings, device: Device) -> str | None:
    if not settings.wan_fp8_attention:
        return None
    if settings.num_gpus > 1:
        return "context parallelism (NUM_GPUS > 1) does not run it"
    if device.type != "cuda":
        return None  # emulated in plain torch on CPU: the tests run the same code
    if device.capability != (9, 0):
        return "FlashAttention-3's float8 kernel needs a Hopper GPU (compute capability 9.0)"
    from models.float8 import attention_self_check

    return attention_self_check()


def _no_compiler(device: Device) -> str | None:
    """Why torch.compile cannot build its kernels here, or None: triton (GPU) builds its launcher with a C
    compiler and Python's headers at run time, inductor's CPU kernels need a C++ compiler."""
    var, names = ("CC", ("cc", "gcc")) if device.type == "cuda" else ("CXX", ("c++", "g++"))
    chosen = os.environ.get(var)
    found = shutil.which(chosen) if chosen else next(filter(None, map(shutil.which, names)), None)
    if not found:
        return f"no compiler to build its kernels ({chosen or names[0]} not found; the image installs gcc and g++)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if device.type == "cuda" and not headers.is_file():
        return f"Python's headers are missing ({headers}; install python3-dev)"
    return None


def _check_parallel(settings: Settings, device: Device, placement: Placement) -> None:
    n = settings.num_gpus
    if settings.wan_compile:
        # diffusers 0.42.1 does not support torch.compile under context parallelism (its own CLI skips
        # compilation with --context-parallel), and the variable-length exchanges break fullgraph tracing.
        raise ParallelError(f"NUM_GPUS={n} cannot be combined with WAN_COMPILE=1 yet (diffusers' context "
                            f"parallelism does not support torch.compile); unset one of them.")
    if device.type == "cuda" and n > device.count:
        raise ParallelError(f"NUM_GPUS is {n} but this machine has {device.count} GPU(s) visible; set NUM_GPUS "
                            f"to at most {device.count} (or give the endpoint {n} GPUs per worker).")
    if settings.wan_fp8 and not placement.keep_both:
        # Float8 Wan is unloaded for image jobs, and enabling context parallelism again is collective.
        raise ParallelError(f"NUM_GPUS={n} with WAN_FP8=1 needs GPUs that hold Wan and SDXL together "
                            f"(80 GB); unset WAN_FP8 or give the endpoint larger GPUs.")


def log_plan(plan: Plan) -> None:
    """One line for the device and placement, one per switch turned off."""
    log.info("device %s, placement %s", plan.device, plan.placement)
    for note in plan.notes:
        log.warning("%s", note)
