"""Wan2.1 image-to-video: how a video is made, in one `generate`.

Loads once in the model card's dtypes (transformer and UMT5 in bf16, CLIP image encoder and VAE in
float32, the VAE in bf16 with WAN_VAE_DTYPE; float32 everything on CPU, the same code), places
the pipeline as the plan says (resident, model CPU offload or group offload), applies the speed
levers that the plan left on (float8 weights and attention, regional compilation with dynamic
shapes, the VAE levers) and warms up with one real short job. `VideoModel` is the interface
`ModelHandler` and the handler use; `parallel.ParallelWan` implements it over several GPUs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

import readahead
import weights
from loras import PipelineLoras
from models import float8
from models.base import Cancelled, Model, Progress, Stopwatch, free_memory, friendly_oom, step_callback, stored_bytes
from models.step_cache import step_cache
from models.vae import channels_last_convs, decoded_frames, reused_encoder_work, uint8_frames
from plan import Placement
from schemas import VideoJob
from settings import Settings

log = logging.getLogger("worker")
Frames = Callable[[np.ndarray], None]  # receives uint8 RGB frames (F, H, W, 3) in order


class VideoModel(Protocol):
    """What the worker needs of the video model, on one GPU (WanModel) or several (parallel.ParallelWan)."""

    name: str
    compiled: bool

    def load(self) -> float: ...

    def park(self) -> None: ...

    def resident(self) -> None: ...

    def warm_up(self) -> float: ...

    def generate(self, job: VideoJob, image: Image.Image, progress: Progress | None = None,
                 cancelled: Cancelled | None = None, on_frames: Frames | None = None,
                 ) -> tuple[np.ndarray, dict[str, float]]: ...


class WanModel(Model):
    """Wan2.1 image-to-video in the model card's dtypes, with its speed switches."""

    name = "wan"

    def __init__(self, settings: Settings, device: torch.device, placement: Placement) -> None:
        super().__init__(settings, device)
        self.pipe = None
        self.placement = placement
        self.compiled = settings.wan_compile
        self.fp8, self.fp8_attention = settings.wan_fp8, settings.wan_fp8_attention
        self.folder: str | None = None  # where load() found the weights
        self._read: tuple[str, ...] = weights.WAN_PARTS  # the subfolders load() read

    def load(self) -> float:
        """Load the pipeline and apply the speed switches; returns seconds spent (0.0 when already loaded)."""
        if self.pipe is not None:
            return 0.0
        start, phases = time.perf_counter(), Stopwatch()  # before the imports: a cold start pays for them too
        pipe = self._pipeline(phases)
        with phases("placing"):
            self._place(pipe)
            channels_last_convs(pipe.vae)
        if self.fp8_attention:
            float8.attend_in_float8(pipe.transformer)
        # Inference only; and loading a LoRA turns requires_grad off, which compiled code would take for a change.
        pipe.transformer.requires_grad_(False)
        if self.compiled:
            # Regional compilation with dynamic shapes: one compile of the repeated block serves every
            # video size and frame count, so auto-sized requests of any aspect ratio run compiled.
            pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
            # Without this, sides equal at warm-up (a square video) would be assumed equal for every job.
            torch.fx.experimental._config.use_duck_shape = False
        self.pipe = pipe
        seconds = time.perf_counter() - start
        log.info("Wan2.1 I2V loaded on %s in %.1f s: %s (profile %s, fp8 %s, fp8 attention %s, compile %s, VAE %s, "
                 "transformer from %s/)", self.device, seconds, phases.summary(stored_bytes(self.folder, self._read)),
                 self.placement.wan_profile, self.fp8, self.fp8_attention, self.compiled, self.settings.wan_vae_dtype,
                 self._read[0])
        return seconds

    def _pipeline(self, phases: Stopwatch):
        with phases("imports"):
            from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
            from transformers import CLIPVisionModel, UMT5EncoderModel

        s = self.settings
        model_id = self.folder = weights.local_folder("wan-i2v", s.wan_model_id, s.weights_download, s.model_dir)
        self._read = weights.wan_parts(model_id, self.fp8)
        stored_fp8 = self._read[0] == weights.FLOAT8_TRANSFORMER
        # The files come off the disk several chunks at a time while diffusers reads them one after another
        # (those a start-up read already took on are left to it).
        readahead.start(model_id, self._read, "Wan2.1 I2V")
        low = self._dtype(torch.bfloat16)
        # Resident weights load straight into GPU memory instead of through a CPU copy; the transformer
        # comes first and is quantized there at once (float8 implies "full"), so float8 loads at disk speed too.
        where = ({"device_map": str(self.device)} if self.device.type == "cuda" and self.placement.wan_profile == "full"
                 else {})
        with phases("weights"):
            transformer = (float8.load(Path(model_id) / self._read[0], self.device, low) if stored_fp8 else
                           WanTransformer3DModel.from_pretrained(model_id, subfolder="transformer", dtype=low,
                                                                 local_files_only=True, **where))
        if self.fp8 and not stored_fp8:
            with phases("quantizing"):
                float8.quantize(transformer)
        # The model card's recipe: image encoder and VAE in float32 (the VAE in bf16 with WAN_VAE_DTYPE,
        # on CPU too, so the tests run the same switch).
        components = {"image_encoder": (CLIPVisionModel, torch.float32),
                      "vae": (AutoencoderKLWan, getattr(torch, self.settings.wan_vae_dtype)),
                      "text_encoder": (UMT5EncoderModel, low)}
        with phases("weights"):
            loaded = {name: cls.from_pretrained(model_id, subfolder=name, dtype=dtype, local_files_only=True,
                                                **where) for name, (cls, dtype) in components.items()}
            pipe = WanImageToVideoPipeline.from_pretrained(model_id, dtype=low, local_files_only=True,
                                                           transformer=transformer, **loaded)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _place(self, pipe) -> None:
        profile = self.placement.wan_profile
        if profile == "full":
            pipe.to(self.device)
        elif profile == "offload":
            pipe.enable_model_cpu_offload(device=self.device)
        else:  # lowvram: stream the transformer's and text encoder's blocks in on CUDA streams
            pipe.vae.to(self.device).enable_tiling()
            pipe.image_encoder.to(self.device)
            pipe.enable_group_offload(onload_device=self.device, offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True, exclude_modules=["vae", "image_encoder"])

    def park(self) -> None:
        if self.pipe is None or self.placement.wan_profile != "full" or self.pipe.device.type != "cuda":
            return
        if self.fp8:
            # Float8 Wan is measured resident only: unload it, and load again (the stored float8 file) on the next
            # video job.
            log.info("Unloading Wan: it does not fit on the GPU beside SDXL, and float8 Wan is not parked")
            self.pipe = self.loras = None
        else:
            log.info("Moving Wan to CPU memory: it does not fit on the GPU beside SDXL")
            self.pipe.to("cpu")
        free_memory()

    def resident(self) -> None:
        # Compared by type: "cuda:0" is where "cuda" put it, and moving float8 weights again would fail.
        if self.placement.wan_profile == "full" and self.pipe.device.type != self.device.type:
            self.pipe.to(self.device)

    def cache_key(self) -> str:
        return self._key(self.pipe.transformer.config, self.fp8, self.fp8_attention)

    def _warm_up_job(self) -> None:
        # One denoising step of the default job (480x832, 81 frames), left undecoded: what compiles is the
        # transformer's blocks, and a second step or the VAE's decode would only add seconds before the first
        # user job. The blocks compile with dynamic shapes, so every other shape reuses this compile; the shape
        # only tunes the kernels' launch heuristics, hence the default one on a GPU. On CPU (the tests) the
        # smallest shape keeps the same path to seconds.
        height, width, frames = (480, 832, 81) if self.device.type == "cuda" else (64, 64, 5)
        with self._offloaded_on_failure():
            self.pipe(image=Image.new("RGB", (width, height)), prompt="warm-up", height=height, width=width,
                      num_frames=frames, num_inference_steps=1, generator=torch.Generator("cpu").manual_seed(0),
                      output_type="latent")

    def _new_loras(self) -> PipelineLoras:
        # Fused adapters are unloaded, so the compiled blocks still match.
        return PipelineLoras(self.pipe, "transformer", "the Wan2.1 I2V transformer", unload_fused=True,
                             requantize=float8.requantizer(self.folder) if self.fp8 else None)

    def generate(self, job: VideoJob, image: Image.Image, progress: Progress | None = None,
                 cancelled: Cancelled | None = None, on_frames: Frames | None = None,
                 on_step: Callable[[], None] | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Wan2.1 image-to-video; `image` is already the job's size. Returns uint8 RGB frames (F, H, W, 3), which
        `on_frames` also gets in order, a few at a time, while the VAE is still decoding the rest. `on_step` runs
        at every step's end (several GPUs: the collective cancel)."""
        from diffusers import UniPCMultistepScheduler

        self.load()
        lora_s = self._use_loras(
            job.loras, self._new_loras,
            # Group offload keeps its own copies of the weights, so fused weights would not stay fused.
            self.settings.lora_fuse and self.placement.wan_profile != "lowvram")
        self.pipe.scheduler = UniPCMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                  flow_shift=job.flow_shift)
        start = time.perf_counter()
        oom = friendly_oom(f"{job.num_frames} frames of {job.width}x{job.height}", "fewer frames or a smaller size")
        with oom, step_cache(self.pipe.transformer, job), self._stance(), self._offloaded_on_failure(), \
                reused_encoder_work(self.pipe.vae), decoded_frames(self.pipe, on_frames) as chunks:
            video = self.pipe(
                image=image, prompt=job.prompt, negative_prompt=job.negative_prompt, height=job.height,
                width=job.width, num_frames=job.num_frames, num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale, generator=torch.Generator("cpu").manual_seed(job.seed),
                output_type="pt", callback_on_step_end=step_callback(
                    progress, "denoise", 0, job.num_inference_steps, cancelled, on_step),
            ).frames[0]
        if chunks:
            frames = np.concatenate(chunks)
        else:  # a tiled decode (lowvram) passes tiles, not frames, through the decoder: hand on the whole video
            frames = uint8_frames(video)
            if on_frames is not None:
                on_frames(frames)
        timings = {"inference_s": time.perf_counter() - start}
        return frames, timings | ({"lora_s": lora_s} if job.loras else {})

    @contextmanager
    def _offloaded_on_failure(self) -> Iterator[None]:
        """A cancelled or failed job leaves the model CPU offload as a finished one does (diffusers offloads
        again only at the end of a successful call), so the next job does not meet a resident transformer."""
        try:
            yield
        except BaseException:
            self.pipe.maybe_free_model_hooks()
            raise
