"""The Wan VAE's speed levers: channels-last 3D convolutions, an encoder that skips work repeating its last
output exactly, and frames handed on as uint8 while the decoder still works on the rest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch


def channels_last_convs(module: torch.nn.Module) -> None:
    """The module's 3D convolutions channels-last: cuDNN's faster kernels for the Wan VAE's encode and decode
    (a layout: the same sums, added in another order on a GPU, so they round differently)."""
    for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv3d)):
        conv.to(memory_format=torch.channels_last_3d)


@contextmanager
def reused_encoder_work(vae: torch.nn.Module) -> Iterator[None]:
    """While inside, each `vae.encode` runs the Wan VAE's encoder layers skipping work that would repeat their
    last output exactly.

    The video an I2V job encodes is its image followed by black frames. The encoder takes it four frames at
    a time and each layer keeps its last frames in a cache; once a layer's input repeats and its cache came
    out of its last call unchanged, it would compute the same values again, so it returns them instead. The
    early full-resolution layers settle within a few latent frames; the deep ones later or not at all.
    """
    encode = vae.encode

    def encode_skipping_repeats(*args: Any, **kwargs: Any) -> Any:
        layers = [*vae.encoder.down_blocks, vae.encoder.mid_block]
        # Wrappers live for one encode only: what they hold (a chunk's activations) is freed when it ends.
        with ExitStack() as wrapped:
            for layer in layers:
                wrapped.enter_context(_replaced(layer, "forward", _RepeatSkipping(layer.forward)))
            return encode(*args, **kwargs)

    with _replaced(vae, "encode", encode_skipping_repeats):
        yield


@contextmanager
def _replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`obj.name` is `value` while inside; afterwards what it was (an instance attribute, or the class's)."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


class _RepeatSkipping:
    """An encoder layer's forward(x, feat_cache, feat_idx) that returns its last output when the call cannot
    change anything: the same input as last time, and its cache entries left unchanged by that last call."""

    def __init__(self, forward: Callable[..., torch.Tensor]) -> None:
        self.forward = forward
        self.cache, self.x, self.out, self.settled, self.entries = None, None, None, False, 0

    def __call__(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006 - diffusers' signature
        if feat_cache is None:  # no cache: nothing carries over between calls
            return self.forward(x, feat_cache, feat_idx)
        if feat_cache is not self.cache:  # a new tile of a tiled encode: start over
            self.cache, self.x, self.out, self.settled = feat_cache, None, None, False
        if self.settled and _same(x, self.x):
            feat_idx[0] += self.entries  # past this layer's cache entries, as its forward would leave it
            return self.out
        start = feat_idx[0]
        before = feat_cache[start:]
        out = self.forward(x, feat_cache, feat_idx)
        self.entries = feat_idx[0] - start
        after = feat_cache[start:feat_idx[0]]
        self.settled = all(_same(a, b) for a, b in zip(before[:self.entries], after, strict=True))
        self.x, self.out = x, out
        return out


def _same(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b))


def uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Frames (F, C, H, W) in [0, 1] -> uint8 RGB (F, H, W, 3), converted where they are (on the GPU, say):
    numpy's float passes over a full-size video cost far more on CPU."""
    return video.permute(0, 2, 3, 1).float().mul_(255).round_().to(torch.uint8).contiguous().cpu().numpy()


@contextmanager
def decoded_frames(pipe: Any, on_frames: Callable[[np.ndarray], None] | None) -> Iterator[list[np.ndarray]]:
    """The frames as the VAE's decoder makes them (1, then 4 per latent frame), as uint8, passed to
    `on_frames` at once: the MP4 encoder then works while the rest decode. Empty for a tiled decode."""
    vae, chunks = pipe.vae, []

    def decoded(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        # The VAE clamps its whole output to [-1, 1] afterwards; clamping each part first is the same.
        frames = uint8_frames(pipe.video_processor.postprocess_video(output.clamp(-1, 1), "pt")[0])
        chunks.append(frames)
        if on_frames is not None:
            on_frames(frames)

    hook = None if vae.use_tiling else vae.decoder.register_forward_hook(decoded)
    try:
        yield chunks
    finally:
        if hook is not None:
            hook.remove()
