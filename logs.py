"""The worker's log: its own format, and third-party notices that read like failures kept out of it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def set_up() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def seconds_since_start() -> float:
    """Seconds since this process started (Linux's /proc): at the top of main, what Python and the imports
    of torch and the worker's modules cost a cold start. NaN where /proc cannot tell."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, in ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def quiet_third_party() -> None:
    """Keep third-party notices that read like failures out of the worker's log; the worker's own lines stay.

    Called before diffusers or transformers is imported.
    """
    # The worker uses no torchao, yet transformers' and diffusers' quantizer registries import it whenever it
    # is installed (a user's image may have it), and it then reports its optional kernels as "Failed to load".
    sys.modules.setdefault("torchao", None)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
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
