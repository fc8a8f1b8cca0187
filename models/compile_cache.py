"""The compile cache: torch's portable compile artifacts in one file per setup, shared by an endpoint's workers.

Kept on the network volume (COMPILE_CACHE_DIR), it lets a later worker skip the part of compiling
that torch's cache artifacts hold. The key covers torch, triton, the GPU, the model's config and
the speed switches, so a worker never loads another setup's kernels. The file is written to a
temporary name and renamed into place, so two workers starting together never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from folders import folder_fault

log = logging.getLogger("worker")
# torch's counters of cache lookups: inductor's kernels (fxgraph) and the traced graphs (aot_autograd).
COUNTERS = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
            "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")}


def cache_key(name: str, device: torch.device, *parts: Any) -> str:
    """What compiled code depends on: torch, triton, the GPU, the model's shapes and the speed switches."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = (torch.cuda.get_device_name(device) + str(torch.cuda.get_device_capability(device))
           if device.type == "cuda" else "cpu")
    text = json.dumps([torch.__version__, triton_version, gpu, *parts], sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def lookups() -> dict[str, int]:
    """torch's cache lookup counts so far (hits, misses and bypasses of inductor's and AOTAutograd's caches)."""
    from torch._dynamo.utils import counters

    return {key: counters[group][key] for group, keys in COUNTERS.items() for key in keys}


def compile_seconds() -> dict[str, float]:
    """Seconds torch.compile has spent so far, by phase: dynamo tracing the Python code, AOTAutograd tracing
    the graph into aten operations (where a tensor subclass such as torchao's float8 costs most), inductor
    generating and building the kernels."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    def total(name: str) -> float:
        return sum(metrics.get(name, ()))

    inductor = total("compile_fx.<locals>.fw_compiler_base")
    return {"trace_s": total("_compile.compile_inner") - total("OutputGraph.call_user_compiler"),
            "aot_s": total("create_aot_dispatcher_function") - inductor, "inductor_s": inductor}


class CompileCache:
    """One file of torch's compile artifacts, at COMPILE_CACHE_DIR/<key>.bin."""

    def __init__(self, directory: str | None, key: str) -> None:
        self.path = Path(directory) / f"{key}.bin" if directory else None

    def load(self) -> bool:
        if self.path is None or not self.path.is_file():
            return False
        try:
            # None for bytes torch cannot read (another version, a corrupt file): torch logs why.
            if torch.compiler.load_cache_artifacts(self.path.read_bytes()) is not None:
                return True
            err: Exception | str = "unreadable artifacts"
        except Exception as raised:  # noqa: BLE001 - a bad cache costs a compile, never the worker
            err = raised
        log.warning("compile cache %s could not be loaded (%s); compiling instead", self.path, err)
        return False

    def save(self) -> bool:
        if self.path is None:
            return False
        try:
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is None:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.", delete=False) as tmp:
                tmp.write(artifacts[0])
            os.replace(tmp.name, self.path)
            log.info("compile cache written to %s (%.1f MB)", self.path, len(artifacts[0]) / 1e6)
            return True
        except Exception as err:  # noqa: BLE001 - a read-only or full volume costs the next worker a compile
            fault = folder_fault(err, "COMPILE_CACHE_DIR", self.path.parent) if isinstance(err, OSError) else None
            log.warning("compile cache %s could not be written: %s; the next worker compiles again", self.path,
                        fault or err)
            return False
