"""The worker's two models, SDXL and Wan2.1 I2V, and `ModelHandler`, which holds them and decides where they live.

Each model class loads its pipeline once (on its first job, or at start-up through
PRELOAD_MODELS or its compile switch), applies its speed switches, warms up with one real
call of its own `generate`, and runs one job at a time. On a GPU the model-card dtypes apply
(SDXL fp16 with the fp16-fix VAE; Wan transformer and UMT5 in bf16, its CLIP image encoder and
VAE in float32, the VAE in bf16 with WAN_VAE_DTYPE); on CPU everything runs in float32, the
same code path. `plan_placement` decides from the card's memory whether both models stay on
the GPU, and whether Wan runs resident, with model CPU offload or with group offload.
Nothing loads at import or construction.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loras import LoraCache, PipelineLoras, lora_disabled
from schemas import ImageJob, LoraSpec, VideoJob, folder_fault, validate_input
from settings import Settings

log = logging.getLogger("worker")
GIB = 1024**3
# Weights in GPU memory: Wan in model-card dtypes (float8 block linears with WAN_FP8), SDXL base + refiner in fp16.
WAN_WEIGHTS_GIB = 44.0
WAN_FP8_WEIGHTS_GIB = 29.0
SDXL_WEIGHTS_GIB = 10.7
HEADROOM_GIB = 16.0  # GPU memory kept free for activations when deciding what stays resident
OFFLOAD_MIN_GIB = 40.0  # smallest card for "offload": the bf16 transformer (30.5 GiB) alone plus activations
LORA_FETCH_TIMEOUT_S = 600.0

Progress = Callable[[str, int, int], None]  # (phase, step, total)
Cancelled = Callable[[], bool]


class GenerationError(RuntimeError):
    """A job that failed in a way the user can act on; str(err) is the sentence they see."""


class ModelUnavailable(GenerationError):
    """Weights are missing locally; the message names the env var and the fetch command."""


class JobCancelled(GenerationError):
    """RunPod cancelled the job (or it timed out); raised from the step callback, so within one step."""


@dataclass(frozen=True)
class Placement:
    """Where each model lives while a job of one mode runs on a GPU."""

    keep_both: bool  # SDXL and Wan may both stay on the GPU
    wan_profile: str  # full: all resident | offload: model CPU offload | lowvram: group offload


def plan_placement(gpu_total_gib: float, profile: str = "auto", fp8: bool = False) -> Placement:
    """Decide residency from the GPU's memory; pure so it can be checked for any card size."""
    wan_gib = WAN_FP8_WEIGHTS_GIB if fp8 else WAN_WEIGHTS_GIB
    if profile == "auto":
        profile = ("full" if gpu_total_gib >= wan_gib + HEADROOM_GIB else
                   "offload" if gpu_total_gib >= OFFLOAD_MIN_GIB else "lowvram")
    keep_both = profile == "full" and gpu_total_gib >= wan_gib + SDXL_WEIGHTS_GIB + HEADROOM_GIB
    return Placement(keep_both=keep_both, wan_profile=profile)


def float8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, scale: float | None = None,
                     is_causal: bool = False) -> torch.Tensor:
    """Attention with query, key and value rounded to float8 (e4m3) under one scale per batch and head.

    Tensors are (batch, tokens, heads, head_dim), as diffusers dispatches them. On CUDA the kernel is
    FlashAttention-3's float8 forward (fa3-fwd, Hopper); on CPU the same rounding is done in plain torch, so
    the tests run this function's arithmetic and the worker's wiring of it.
    """
    if attn_mask is not None or is_causal:
        raise ValueError(f"WAN_FP8_ATTENTION runs unmasked, non-causal attention only, got attn_mask "
                         f"{'set' if attn_mask is not None else 'None'} and is_causal={is_causal}")
    # Softmax ignores what all keys share (q . mean(k) is one constant per query row), and each output row
    # is a weighted mean of v's rows: with both means taken out, float8 rounds only what varies.
    key = key - key.mean(dim=1, keepdim=True)
    v_mean = value.mean(dim=1, keepdim=True)
    (q, q_scale), (k, k_scale), (v, v_scale) = (_to_float8(t) for t in (query, key, value - v_mean))
    scale = scale or q.shape[-1] ** -0.5
    if q.device.type == "cuda":
        import fa3_fwd_interface

        # The registered custom op itself (one node for torch.compile, with its fake kernel); the public
        # flash_attn_func wraps it in an autograd.Function, which inference does not need.
        out = fa3_fwd_interface._flash_attn_forward(q, k, v, q_descale=q_scale, k_descale=k_scale,
                                                    v_descale=v_scale, softmax_scale=scale)[0]
    else:  # FlashAttention-3's arithmetic: the probabilities exp(s - row max), in [0, 1], are float8 too
        q, k, v = (x.float().mul(s[:, None, :, None]).transpose(1, 2)
                   for x, s in ((q, q_scale), (k, k_scale), (v, v_scale)))
        logits = q @ k.transpose(-1, -2) * scale
        p = (logits - logits.amax(dim=-1, keepdim=True)).exp()
        out = ((p.to(torch.float8_e4m3fn).float() @ v) / p.sum(dim=-1, keepdim=True)).transpose(1, 2)
    return (out.float() + v_mean).to(query.dtype)


def _to_float8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t / scale in float8_e4m3fn, and the scale (batch, heads): each head's largest value maps to 448."""
    # The scale in t's dtype, so the division makes no float32 copy of t; the kernel gets that same scale.
    scale = (t.abs().amax(dim=(1, 3)).float().clamp(min=1e-6) / torch.finfo(torch.float8_e4m3fn).max).to(t.dtype)
    return (t / scale[:, None, :, None]).to(torch.float8_e4m3fn), scale.float()


def make_scheduler(name: str, config: Any):
    """A fresh SDXL scheduler per job (schedulers carry per-run state), built from the model's config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LMSDiscreteScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    factories = {
        "DDIM": (DDIMScheduler, {}),
        "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
        "KLMS": (LMSDiscreteScheduler, {}),
        "K_EULER": (EulerDiscreteScheduler, {}),
        "K_EULER_ANCESTRAL": (EulerAncestralDiscreteScheduler, {}),
        "DPMSolverMultistep": (DPMSolverMultistepScheduler, {}),
        "DPMSolverSinglestep": (DPMSolverSinglestepScheduler, {}),
        "DPMSolverMultistep_Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "UniPC": (UniPCMultistepScheduler, {}),
    }
    cls, overrides = factories[name]
    return cls.from_config(config, **overrides)


class _Model:
    """What SDXL and Wan share: settings, device, LoRA switching, compile stance and the compile cache."""

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
        """Run one real, short job at the default shape so that compilation happens before any user job.

        The compile cache (COMPILE_CACHE_DIR) is loaded first and written after, so that later workers
        of an endpoint skip the part of compiling that torch's cache artifacts hold (inductor's kernels).
        """
        from torch._dynamo.utils import counters

        cache = CompileCache(self.settings.compile_cache_dir, self.cache_key()) if self.compiled else None
        loaded = cache.load() if cache else False
        hits = counters["inductor"]["fxgraph_cache_hit"]
        start = time.perf_counter()
        self._warming_up = True
        try:
            self._warm_up_job()
        finally:
            self._warming_up = False
        seconds = time.perf_counter() - start
        written = cache.save() if cache and not loaded else False
        hits = counters["inductor"]["fxgraph_cache_hit"] - hits
        cached = (f" ({hits} compiled graphs from the compile cache {cache.path})" if loaded else
                  f" (compiled; cache written to {cache.path})" if written else "")
        log.info("%s warm-up took %.1f s%s", self.name, seconds, cached)
        return seconds

    def _warm_up_job(self) -> None:
        raise NotImplementedError

    def cache_key(self) -> str:
        raise NotImplementedError

    def _key(self, *parts: Any) -> str:
        """What compiled code depends on: torch, triton, the GPU, the model's shapes and the speed switches."""
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        gpu = (torch.cuda.get_device_name(self.device) + str(torch.cuda.get_device_capability(self.device))
               if self.device.type == "cuda" else "cpu")
        text = json.dumps([torch.__version__, triton_version, gpu, *parts], sort_keys=True,
                          default=str)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


class SdxlModel(_Model):
    """SDXL base + refiner (sharing the VAE and the big text encoder) as an ensemble of experts."""

    name = "sdxl"

    def __init__(self, settings: Settings, device: torch.device) -> None:
        super().__init__(settings, device)
        self.base = self.refiner = None
        self.compiled = settings.sdxl_compile

    def load(self) -> float:
        """Load base + refiner onto the device; returns seconds spent (0.0 when already loaded)."""
        if self.base is not None:
            return 0.0
        start = time.perf_counter()  # before the imports: a cold start pays for them too
        from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        s, dtype = self.settings, self._dtype(torch.float16)
        with _missing_weights("SDXL_VAE_ID", s.sdxl_vae_id, "sdxl"):
            vae = AutoencoderKL.from_pretrained(s.sdxl_vae_id, dtype=dtype, local_files_only=True)
        with _missing_weights("SDXL_MODEL_ID", s.sdxl_model_id, "sdxl"):
            base = StableDiffusionXLPipeline.from_pretrained(
                s.sdxl_model_id, vae=vae, dtype=dtype, variant="fp16", use_safetensors=True,
                add_watermarker=False, local_files_only=True)
        with _missing_weights("SDXL_REFINER_ID", s.sdxl_refiner_id, "sdxl"):
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                s.sdxl_refiner_id, vae=vae, text_encoder_2=base.text_encoder_2, dtype=dtype, variant="fp16",
                use_safetensors=True, add_watermarker=False, local_files_only=True)
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)
            if self.compiled:
                # Kernel launches dominate an eager SDXL step at 1024x1024; whole-UNet compilation with CUDA
                # graphs removes them. In place, so pipe.unet stays the UNet (LoRA loading, config).
                pipe.unet.compile(mode="reduce-overhead", fullgraph=True)
        self.base, self.refiner = base.to(self.device), refiner.to(self.device)
        seconds = time.perf_counter() - start
        log.info("SDXL loaded on %s in %.1f s", self.device, seconds)
        return seconds

    def park(self) -> None:
        if self.base is not None and self.base.device.type == "cuda":
            log.info("Moving SDXL to CPU memory: it does not fit on the GPU beside Wan")
            self.base.to("cpu")
            self.refiner.to("cpu")
            free_memory()

    def resident(self) -> None:
        if self.base.device.type != self.device.type:  # "cuda:0" is where "cuda" put it
            self.base.to(self.device)
            self.refiner.to(self.device)

    def cache_key(self) -> str:
        return self._key(self.base.unet.config, self.refiner.unet.config)

    def _warm_up_job(self) -> None:
        # The default size, with few steps: enough for both UNets' CUDA graphs to be recorded. On CPU (the
        # tests) a small size keeps the same path to seconds.
        size = {} if self.device.type == "cuda" else {"height": 128, "width": 128}
        job = validate_input({"prompt": "warm-up", "seed": 0, "num_inference_steps": 5,
                              "refiner_inference_steps": 10, **size}, self.settings)
        self.generate(job, None)

    def generate(self, job: ImageJob, init_image: Image.Image | None, progress: Progress | None = None,
                 cancelled: Cancelled | None = None) -> tuple[list[Image.Image], dict[str, float]]:
        """Base + refiner as an ensemble of experts, or refiner img2img when an init image is given."""
        self.load()
        lora_s = self._use_loras(job.loras, lambda: PipelineLoras(self.base, "unet", "the SDXL base model"),
                                 self.settings.lora_fuse)
        self.base.scheduler = make_scheduler(job.scheduler, self.base.scheduler.config)
        self.refiner.scheduler = make_scheduler(job.scheduler, self.refiner.scheduler.config)
        common = dict(prompt=job.prompt, negative_prompt=job.negative_prompt, guidance_scale=job.guidance_scale,
                      num_images_per_prompt=job.num_images, generator=torch.Generator("cpu").manual_seed(job.seed))
        total = job.base_steps + job.refiner_steps
        refine = _step_callback(progress, "refine", job.base_steps, total, cancelled)
        start = time.perf_counter()
        oom = _friendly_oom(f"{job.num_images} image(s) of {job.width}x{job.height}", "fewer images or a smaller size")
        with oom, self._stance():
            if init_image is None:
                latents = self.base(height=job.height, width=job.width, num_inference_steps=job.num_inference_steps,
                                    denoising_end=job.high_noise_frac, output_type="latent",
                                    callback_on_step_end=_step_callback(progress, "base", 0, total, cancelled),
                                    **common).images
                refiner_input = dict(image=latents, denoising_start=job.high_noise_frac)
            else:
                refiner_input = dict(image=init_image, strength=job.strength)
            # LoRAs are base-only: the refiner shares the base's second text encoder, so they are off there.
            with lora_disabled(self.refiner.text_encoder_2):
                images = self.refiner(num_inference_steps=job.refiner_inference_steps, callback_on_step_end=refine,
                                      **refiner_input, **common).images
        timings = {"inference_s": time.perf_counter() - start}
        return images, timings | ({"lora_s": lora_s} if job.loras else {})


class WanModel(_Model):
    """Wan2.1 image-to-video in the model card's dtypes, with its speed switches."""

    name = "wan"

    def __init__(self, settings: Settings, device: torch.device, placement: Placement) -> None:
        super().__init__(settings, device)
        self.pipe = None
        self.placement = placement
        self.compiled = settings.wan_compile
        self.fp8 = _use_fp8(settings.wan_fp8, device, placement.wan_profile)
        self.fp8_attention = _use_fp8_attention(settings.wan_fp8_attention, device, settings.num_gpus)
        self.on_step: Callable[[], None] | None = None  # called at every step end (parallel.py's collective cancel)

    def load(self) -> float:
        """Load the pipeline and apply the speed switches; returns seconds spent (0.0 when already loaded)."""
        if self.pipe is not None:
            return 0.0
        start = time.perf_counter()  # before the imports: a cold start pays for them too
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
        from transformers import CLIPVisionModel, UMT5EncoderModel

        model_id, low, fp8 = self.settings.wan_model_id, self._dtype(torch.bfloat16), self.fp8
        profile = self.placement.wan_profile
        # Resident weights load straight into GPU memory instead of through a CPU copy; the transformer
        # comes first and is quantized there at once (float8 implies "full"), so float8 loads at disk speed too.
        where = {"device_map": str(self.device)} if self.device.type == "cuda" and profile == "full" else {}
        with _missing_weights("WAN_MODEL_ID", model_id, "wan"):
            transformer = WanTransformer3DModel.from_pretrained(model_id, subfolder="transformer", dtype=low,
                                                                local_files_only=True, **where)
            if fp8:
                _quantize_fp8(transformer)
            # The model card's recipe: image encoder and VAE in float32 (the VAE in bf16 with WAN_VAE_DTYPE,
            # on CPU too, so the tests run the same switch).
            components = {"image_encoder": (CLIPVisionModel, torch.float32),
                          "vae": (AutoencoderKLWan, getattr(torch, self.settings.wan_vae_dtype)),
                          "text_encoder": (UMT5EncoderModel, low)}
            loaded = {name: cls.from_pretrained(model_id, subfolder=name, dtype=dtype, local_files_only=True, **where)
                      for name, (cls, dtype) in components.items()}
            pipe = WanImageToVideoPipeline.from_pretrained(model_id, dtype=low, local_files_only=True,
                                                           transformer=transformer, **loaded)
        pipe.set_progress_bar_config(disable=True)
        if profile == "full":
            pipe.to(self.device)
        elif profile == "offload":
            pipe.enable_model_cpu_offload(device=self.device)
        else:  # lowvram: stream the transformer's and text encoder's blocks in on CUDA streams
            pipe.vae.to(self.device).enable_tiling()
            pipe.image_encoder.to(self.device)
            pipe.enable_group_offload(onload_device=self.device, offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True, exclude_modules=["vae", "image_encoder"])
        channels_last_convs(pipe.vae)
        if self.fp8_attention:
            _attend_in_float8(pipe.transformer)
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
        log.info("Wan2.1 I2V loaded on %s in %.1f s (profile %s, fp8 %s, fp8 attention %s, compile %s, VAE %s)",
                 self.device, seconds, profile, fp8, self.fp8_attention, self.compiled, self.settings.wan_vae_dtype)
        return seconds

    def park(self) -> None:
        if self.pipe is None or self.placement.wan_profile != "full" or self.pipe.device.type != "cuda":
            return
        if self.fp8:
            # Float8 weights cannot move to CPU memory: unload, and load again on the next video job.
            log.info("Unloading Wan: it does not fit on the GPU beside SDXL, and float8 weights cannot be parked")
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
        # The default job (480x832, 81 frames) with 2 steps. The blocks compile with dynamic shapes, so every
        # other shape reuses this compile; the shape only tunes the kernels' launch heuristics, hence the
        # default one on a GPU. On CPU (the tests) the smallest shape keeps the same path to seconds.
        shape = {"height": 480, "width": 832} if self.device.type == "cuda" else {"height": 64, "width": 64,
                                                                                  "num_frames": 5}
        job = validate_input({"mode": "video", "prompt": "warm-up", "image_url": "-", "seed": 0,
                              "num_inference_steps": 2, **shape}, self.settings)
        self.generate(job, Image.new("RGB", (job.width, job.height)))

    def _new_loras(self) -> PipelineLoras:
        # Fused adapters are unloaded, so the compiled blocks still match.
        return PipelineLoras(self.pipe, "transformer", "the Wan2.1 I2V transformer", unload_fused=True,
                             requantize=_fp8_requantizer(self.settings.wan_model_id) if self.fp8 else None)

    def generate(self, job: VideoJob, image: Image.Image, progress: Progress | None = None,
                 cancelled: Cancelled | None = None, on_frames: Callable[[np.ndarray], None] | None = None,
                 ) -> tuple[np.ndarray, dict[str, float]]:
        """Wan2.1 image-to-video; `image` is already the job's size. Returns uint8 RGB frames (F, H, W, 3), which
        `on_frames` also gets in order, a few at a time, while the VAE is still decoding the rest."""
        from diffusers import UniPCMultistepScheduler

        self.load()
        lora_s = self._use_loras(
            job.loras, self._new_loras,
            # Group offload keeps its own copies of the weights, so fused weights would not stay fused.
            self.settings.lora_fuse and self.placement.wan_profile != "lowvram")
        self.pipe.scheduler = UniPCMultistepScheduler.from_config(self.pipe.scheduler.config,
                                                                  flow_shift=job.flow_shift)
        start = time.perf_counter()
        oom = _friendly_oom(f"{job.num_frames} frames of {job.width}x{job.height}", "fewer frames or a smaller size")
        with oom, _step_cache(self.pipe.transformer, job), self._stance(), self._offloaded_on_failure(), \
                reused_encoder_work(self.pipe.vae), self._decoded_frames(on_frames) as chunks:
            video = self.pipe(
                image=image, prompt=job.prompt, negative_prompt=job.negative_prompt, height=job.height,
                width=job.width, num_frames=job.num_frames, num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale, generator=torch.Generator("cpu").manual_seed(job.seed),
                output_type="pt", callback_on_step_end=_step_callback(
                    progress, "denoise", 0, job.num_inference_steps, cancelled, self.on_step),
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
    def _decoded_frames(self, on_frames: Callable[[np.ndarray], None] | None) -> Iterator[list[np.ndarray]]:
        """The frames as the VAE's decoder makes them (1, then 4 per latent frame), as uint8, passed to
        `on_frames` at once: the MP4 encoder then works while the rest decode. Empty for a tiled decode."""
        vae, chunks = self.pipe.vae, []

        def decoded(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            # The VAE clamps its whole output to [-1, 1] afterwards; clamping each part first is the same.
            frames = uint8_frames(self.pipe.video_processor.postprocess_video(output.clamp(-1, 1), "pt")[0])
            chunks.append(frames)
            if on_frames is not None:
                on_frames(frames)

        hook = None if vae.use_tiling else vae.decoder.register_forward_hook(decoded)
        try:
            yield chunks
        finally:
            if hook is not None:
                hook.remove()

    @contextmanager
    def _offloaded_on_failure(self) -> Iterator[None]:
        """A cancelled or failed job leaves the model CPU offload as a finished one does (diffusers offloads
        again only at the end of a successful call), so the next job does not meet a resident transformer."""
        try:
            yield
        except BaseException:
            self.pipe.maybe_free_model_hooks()
            raise


class ModelHandler:
    """Holds both models for the life of the worker process and keeps the one a job needs on the GPU."""

    def __init__(self, settings: Settings, device: str | None = None, gpu_memory_gib: float | None = None) -> None:
        self.settings = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            total = gpu_memory_gib or torch.cuda.get_device_properties(self.device).total_memory / GIB
            self.placement = plan_placement(total, settings.memory_profile, settings.wan_fp8)
        else:
            self.placement = Placement(keep_both=True, wan_profile="full")
        self.sdxl = SdxlModel(settings, self.device)
        self.wan = WanModel(settings, self.device, self.placement)
        log.info("device %s, placement %s", self.device, self.placement)

    def model(self, mode: str) -> tuple[SdxlModel | WanModel, float]:
        """The mode's model, loaded and on the GPU (the other parked first if both do not fit); load seconds."""
        wanted, other = (self.sdxl, self.wan) if mode == "image" else (self.wan, self.sdxl)
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
            if name not in self.settings.preload and not model.compiled:
                continue
            try:
                _, seconds[f"{name}_load_s"] = self.model(mode)
                if model.compiled:
                    seconds[f"{name}_warm_up_s"] = model.warm_up()
            except Exception as err:  # noqa: BLE001 - keep serving; each job then reports its own error
                log.error("start-up of %s failed, the worker keeps serving (%s: %s)", name, type(err).__name__,
                          str(err).splitlines()[0][:300] if str(err) else "")
                free_memory()
        return seconds


class CompileCache:
    """torch's portable compile artifacts in one file per key, shared by an endpoint's workers on its volume.

    The key covers torch, triton, the GPU, the model's config and the speed switches, so a worker never
    loads another setup's kernels. The file is written to a temporary name and renamed into place, so two
    workers starting together never see a partial file.
    """

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


@contextmanager
def _step_cache(transformer: torch.nn.Module, job: VideoJob) -> Iterator[None]:
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


def fp8_capable(device: torch.device) -> bool:
    """Float8 matmuls need a GPU of compute capability 8.9+ (Ada, Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _use_fp8(wanted: bool, device: torch.device, profile: str) -> bool:
    """Whether WAN_FP8 applies: it needs float8 matmuls and weights that stay on the GPU; says why when not."""
    if not wanted:
        return False
    if not fp8_capable(device):
        log.warning("WAN_FP8 is ignored on %s: float8 matmuls need a GPU of compute capability 8.9+ "
                    "(Ada, Hopper)", device)
        return False
    if profile != "full":
        # torchao quantizes on the GPU, and its float8 weights cannot be moved to CPU memory and back
        # (`Couldn't swap Linear.weight`), which model and group offload do at every job.
        log.warning("WAN_FP8 is ignored with the %s profile: float8 weights must stay on the GPU", profile)
        return False
    return True


def _use_fp8_attention(wanted: bool, device: torch.device, num_gpus: int) -> bool:
    """Whether WAN_FP8_ATTENTION applies: on CPU (emulated) or a Hopper GPU with fa3-fwd; says why when not."""
    if not wanted:
        return False
    why = None
    if num_gpus > 1:
        why = "context parallelism (NUM_GPUS > 1) does not run it"
    elif device.type == "cuda":
        if torch.cuda.get_device_capability(device) != (9, 0):
            why = "FlashAttention-3's float8 kernel needs a Hopper GPU (compute capability 9.0)"
        else:
            try:
                import fa3_fwd_interface  # noqa: F401
            except (ImportError, OSError) as err:  # OSError: a CUDA 12 image lacks the libcudart.so.13 it links
                why = f"fa3-fwd does not load ({err})"
    if why:
        log.warning("WAN_FP8_ATTENTION is ignored on %s: %s", device, why)
    return why is None


def _attend_in_float8(transformer: torch.nn.Module) -> None:
    """Each block's self-attention (32,760 tokens at 480x832x81; quadratic in them, unlike the linears) in
    float8; cross-attention over the 769 text and image tokens stays bf16. diffusers dispatches attention by
    backend name, and the worker serves FlashAttention-3's name with its float8 function (it loads no other
    FA3)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    # Process-wide: anything else set to "_flash_3" would get float8 too, and nothing else here is.
    _AttentionBackendRegistry.register(AttentionBackendName._FLASH_3)(float8_attention)
    for block in transformer.blocks:
        block.attn1.set_attention_backend(AttentionBackendName._FLASH_3.value)


def _quantize_fp8(transformer: torch.nn.Module) -> None:
    """Float8 weights and dynamic float8 activations (per row) for the transformer blocks' linears.

    The embedders and the output projection stay in bf16: they are small and most sensitive.
    """
    from torchao.quantization import quantize_

    quantize_(transformer, _fp8_config(),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn.startswith("blocks."))


def _fp8_config() -> Any:
    """WAN_FP8's torchao config (fusing a LoRA re-quantizes the merged weights with it)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _fp8_requantizer(model_id: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """For fusing a LoRA under WAN_FP8: the transformer's weight `name` plus `delta`, quantized as WAN_FP8 does.

    From the weight in the model files, not the dequantized float8 one: that lies on the float8 grid,
    where a LoRA's change smaller than half a step would round back to nothing.
    """
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    root = Path(model_id) if Path(model_id).is_dir() else Path(
        snapshot_download(model_id, allow_patterns=["transformer/*"], local_files_only=True))
    folder = root / "transformer"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    opened: dict[str, Any] = {}  # one open per file, not per weight

    def requantize(name: str, delta: torch.Tensor) -> torch.Tensor:
        from torchao.quantization import quantize_

        file = files.get(name, "diffusion_pytorch_model.safetensors")
        if file not in opened:
            opened[file] = safe_open(folder / file, framework="pt")
        holder = torch.nn.Linear(delta.shape[1], delta.shape[0], bias=False, device="meta")
        stored = opened[file].get_tensor(name).to(delta.device, delta.dtype)
        holder.weight = torch.nn.Parameter(stored + delta, requires_grad=False)
        quantize_(holder, _fp8_config())
        return holder.weight

    return requantize


def _step_callback(progress: Progress | None, phase: str, offset: int, total: int, cancelled: Cancelled | None,
                   on_step: Callable[[], None] | None = None):
    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        if on_step is not None:
            on_step()
        if cancelled is not None and cancelled():
            raise JobCancelled(f"The job was cancelled after {phase} step {offset + step + 1} of {total}.")
        if progress is not None:
            progress(phase, offset + step + 1, total)
        return kwargs

    return callback


class _missing_weights:
    """Turn 'not in the local cache' into one sentence naming the env var and the fetch command."""

    def __init__(self, env_var: str, model_id: str, group: str) -> None:
        self.env_var, self.model_id, self.group = env_var, model_id, group

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        # from_pretrained(local_files_only=True) raises OSError for a hub id not in the cache and
        # for a folder that does not exist or lacks the files.
        if exc_type is not None and issubclass(exc_type, OSError):
            raise ModelUnavailable(
                f"Model weights for {self.env_var}={self.model_id!r} are not available locally; fetch them with "
                f"'python download_weights.py --only {self.group}' or point {self.env_var} at a model folder."
            ) from exc
        return False


class _friendly_oom:
    """CUDA out-of-memory -> a GenerationError saying what to ask for instead; frees the memory."""

    def __init__(self, what: str, advice: str) -> None:
        self.what, self.advice = what, advice

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
            free_memory()
            raise GenerationError(f"The GPU ran out of memory generating {self.what}; ask for {self.advice}.") from None
        return False


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
