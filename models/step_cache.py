"""Step caching (the request's `step_cache`): reuse transformer work across denoising steps, for one job."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from schemas import VideoJob


@contextmanager
def step_cache(transformer: torch.nn.Module, job: VideoJob) -> Iterator[None]:
    """Enable the request's step cache for one job only; always removed afterwards."""
    if job.step_cache == "off":
        yield
        return
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    config = (FirstBlockCacheConfig(threshold=job.step_cache_threshold) if job.step_cache == "first_block"
              # Lite mode predicts only proj_out and skips the blocks on predicted steps: caching every
              # block's outputs ran out of memory at full size; diffusers' default patterns match no Wan module.
              else TaylorSeerCacheConfig(taylor_factors_dtype=transformer.dtype, use_lite_mode=True))
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()
