"""ModelHandler: loads the SDXL and Wan2.1 pipelines once, places them, and runs one job each.

Nothing loads at import or construction: SDXL loads on the first image job and Wan on the
first video job (or at start-up through PRELOAD_MODELS), then both stay. On a GPU the
model-card dtypes apply (SDXL fp16 with the fp16-fix VAE; Wan transformer and UMT5 in
bf16, its CLIP image encoder and VAE in fp32, the VAE in bf16 with WAN_VAE_DTYPE); on CPU
everything else runs in float32, the same code path. When both models cannot be resident
on the GPU at once, the one not needed is parked in CPU memory before the other runs, and
Wan falls back to diffusers' model CPU offload or group offload if it cannot fit alone.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from loras import LoraCache, LoraSpec, PipelineLoras, job_loras, lora_disabled
from settings import Settings

log = logging.getLogger("worker")
GIB = 1024**3
# Weights in GPU memory (DESIGN.md section 4): Wan in model-card dtypes, SDXL base + refiner in fp16.
WAN_WEIGHTS_GIB = 44.0
SDXL_WEIGHTS_GIB = 10.7

Progress = Callable[[str, int, int], None]  # (phase, step, total)


class GenerationError(RuntimeError):
    """A job that failed in a way the user can act on; str(err) is the sentence they see."""


class ModelUnavailable(GenerationError):
    """Weights are missing locally; the message names the env var and the fetch command."""


# The transformer's block linears in float8 (torchao) take ~15 GiB instead of ~30.5 GiB.
WAN_FP8_WEIGHTS_GIB = 29.0
# Smallest card for "offload": the bf16 transformer (30.5 GiB) alone plus activations.
OFFLOAD_MIN_GIB = 40.0


@dataclass(frozen=True)
class Placement:
    """Where each model lives while a job of one mode runs on a GPU."""

    keep_both: bool  # SDXL and Wan may both stay on the GPU
    wan_profile: str  # full: all resident | offload: model CPU offload | lowvram: group offload


def plan_placement(gpu_total_gib: float, headroom_gib: float, profile: str = "auto", fp8: bool = False,
                   sdxl_gib: float = SDXL_WEIGHTS_GIB) -> Placement:
    """Decide residency from the GPU's memory; pure so it can be checked for any card size."""
    wan_gib = WAN_FP8_WEIGHTS_GIB if fp8 else WAN_WEIGHTS_GIB
    if profile == "auto":
        if gpu_total_gib >= wan_gib + headroom_gib:
            profile = "full"
        elif gpu_total_gib >= OFFLOAD_MIN_GIB:
            profile = "offload"
        else:  # measured on a 24 GB emulation: 13.8 GiB peak, 7.8 s/step (benchmarks/RESULTS.md)
            profile = "lowvram"
    keep_both = profile == "full" and gpu_total_gib >= wan_gib + sdxl_gib + headroom_gib
    return Placement(keep_both=keep_both, wan_profile=profile)


def pick_attention_backend(requested: str, device: torch.device) -> str:
    """The attention backend to use: the request, else the fastest one importable for this device.

    On Hopper, PyTorch's own SDPA (flash) measured faster than cuDNN attention and than the PyPI
    sageattention build (DESIGN.md section 6); FlashAttention 3 is preferred when installed.
    """
    if requested != "auto":
        return requested
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn_interface") is not None:
            return "_flash_3"
    return "native"


def make_scheduler(name: str, config: Any):
    """A fresh scheduler per job (schedulers carry per-run state), built from the model's config."""
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


class ModelHandler:
    """Owns the pipelines for the life of the worker process."""

    def __init__(self, settings: Settings, device: str | None = None) -> None:
        self.settings = settings
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.base = self.refiner = self.wan = None
        self._loras: dict[str, PipelineLoras] = {}  # "sdxl" / "wan": adapters loaded into that pipeline
        self._warming_up = False  # compilation is allowed only then (see _compiled_only)
        if self.device.type == "cuda":
            total = settings.gpu_memory_gib or torch.cuda.get_device_properties(self.device).total_memory / GIB
            self.placement = plan_placement(total, settings.gpu_headroom_gib, settings.memory_profile, settings.wan_fp8)
        else:
            self.placement = Placement(keep_both=True, wan_profile="full")
        self.attention_backend = pick_attention_backend(settings.attention_backend, self.device)
        log.info("device %s, placement %s, attention backend %s", self.device, self.placement, self.attention_backend)

    # ------------------------------------------------------------------ loading
    def _dtype(self, gpu_dtype: torch.dtype) -> torch.dtype:
        return gpu_dtype if self.device.type == "cuda" else torch.float32

    def load_sdxl(self) -> float:
        """Load SDXL base + refiner (sharing VAE and the big text encoder); returns seconds spent."""
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
            pipe.unet.set_attention_backend(self.attention_backend)
        self.base, self.refiner = base.to(self.device), refiner.to(self.device)
        if s.sdxl_fuse_qkv:  # on the device: concatenating fp16 weights on the CPU took seconds
            for pipe in (base, refiner):
                pipe.unet.fuse_qkv_projections()
        if s.sdxl_compile:
            # The eager UNet keeps the GPU busy ~40% of a step: kernel launches dominate at 1024x1024.
            # Whole-UNet compilation with CUDA graphs removes them (13.4 -> 27.0 it/s, benchmarks/RESULTS.md).
            # Compiled in place, so pipe.unet stays the UNet (LoRA loading, config) and only its call changes.
            for pipe in (base, refiner):
                pipe.unet.compile(mode="reduce-overhead", fullgraph=True)
        seconds = time.perf_counter() - start
        log.info("SDXL loaded on %s in %.1f s", self.device, seconds)
        return seconds

    def load_wan(self) -> float:
        """Load the Wan2.1 I2V pipeline in model-card dtypes; returns seconds spent."""
        if self.wan is not None:
            return 0.0
        start = time.perf_counter()  # before the imports: a cold start pays for them too
        from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
        from transformers import CLIPVisionModel, UMT5EncoderModel

        model_id = self.settings.wan_model_id
        low = self._dtype(torch.bfloat16)
        # When everything stays resident (and nothing is quantized first), the safetensors load
        # straight into GPU memory instead of through a CPU copy (WAN_LOAD_TO_GPU).
        direct = (self.settings.wan_load_to_gpu and self.device.type == "cuda"
                  and self.placement.wan_profile == "full" and not self.settings.wan_fp8)
        where = {"device_map": str(self.device)} if direct else {}
        # The VAE may run in bf16 (WAN_VAE_DTYPE), on CPU too, so the tests run the same switch.
        vae_dtype = getattr(torch, self.settings.wan_vae_dtype)
        with _missing_weights("WAN_MODEL_ID", model_id, "wan"):
            # The model card's recipe, component by component: image encoder and VAE in float32.
            components = {
                "image_encoder": (CLIPVisionModel, torch.float32), "vae": (AutoencoderKLWan, vae_dtype),
                "text_encoder": (UMT5EncoderModel, low), "transformer": (WanTransformer3DModel, low)}
            loaded = {name: cls.from_pretrained(model_id, subfolder=name, dtype=dtype, local_files_only=True, **where)
                      for name, (cls, dtype) in components.items()}
            pipe = WanImageToVideoPipeline.from_pretrained(model_id, dtype=low, local_files_only=True, **loaded)
        pipe.set_progress_bar_config(disable=True)
        profile = self.placement.wan_profile
        if self.settings.wan_fp8 and not _fp8_capable(self.device):
            log.warning("WAN_FP8 is ignored on %s: float8 matmuls need a GPU of compute capability 8.9+ "
                        "(Ada, Hopper)", self.device)
        elif self.settings.wan_fp8 and profile == "lowvram":
            # torchao quantizes on the GPU, so the bf16 transformer (30.5 GiB) would have to fit
            # there first: on a 24 GB card that failed with out-of-memory (benchmarks/RESULTS.md).
            log.warning("WAN_FP8 is ignored with the lowvram profile: quantizing needs the bf16 transformer on the GPU")
        elif self.settings.wan_fp8:
            # torchao quantizes on the GPU; the transformer goes there first, whatever the profile.
            pipe.transformer.to(self.device)
            _quantize_fp8(pipe.transformer)
        if profile == "full":
            pipe.to(self.device)
        elif profile == "offload":
            pipe.enable_model_cpu_offload(device=self.device)
        else:  # lowvram: stream the transformer's and text encoder's blocks in on CUDA streams
            pipe.vae.to(self.device).enable_tiling()
            pipe.image_encoder.to(self.device)
            pipe.enable_group_offload(onload_device=self.device, offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True, exclude_modules=["vae", "image_encoder"])
        pipe.transformer.set_attention_backend(self.attention_backend)
        if self.settings.wan_compile:
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        self.wan = pipe
        seconds = time.perf_counter() - start
        log.info("Wan2.1 I2V loaded on %s in %.1f s (profile %s, fp8 %s, compile %s, VAE %s)", self.device, seconds,
                 profile, self.settings.wan_fp8, self.settings.wan_compile, self.settings.wan_vae_dtype)
        return seconds

    # ---------------------------------------------------------------- placement
    def _park_sdxl(self) -> None:
        if self.base is not None and self.base.device.type == "cuda":
            log.info("Moving SDXL to CPU memory: it does not fit on the GPU beside Wan")
            self.base.to("cpu")
            self.refiner.to("cpu")
            free_memory()

    def _park_wan(self) -> None:
        if self.wan is not None and self.placement.wan_profile == "full" and self.wan.device.type == "cuda":
            log.info("Moving Wan to CPU memory: it does not fit on the GPU beside SDXL")
            self.wan.to("cpu")
            free_memory()

    def prepare(self, mode: str) -> float:
        """Load what the mode needs and make it resident; returns load seconds."""
        # Park the other model first, so its memory is free before this one loads or moves in.
        if mode == "image":
            if not self.placement.keep_both:
                self._park_wan()
            seconds = self.load_sdxl()
            if self.base.device != self.device:
                self.base.to(self.device)
                self.refiner.to(self.device)
            return seconds
        if not self.placement.keep_both:
            self._park_sdxl()
        seconds = self.load_wan()
        if self.placement.wan_profile == "full" and self.wan.device != self.device:
            self.wan.to(self.device)
        return seconds

    def compiled(self, mode: str) -> bool:
        """Whether the mode's model is compiled (WAN_COMPILE / SDXL_COMPILE)."""
        return self.settings.sdxl_compile if mode == "image" else self.settings.wan_compile

    def compile_now(self, mode: str) -> float | None:
        """At start-up: warm up (and so compile) the mode's model when it is compiled; returns seconds or None."""
        return self.warm_up(mode) if self.compiled(mode) else None

    def warm_up(self, mode: str, **shape: int) -> float:
        """Run a short job of the mode at its default shape, so compilation happens before any user job.

        Video: 2 steps at 480x832, 81 frames. Image: 1024x1024, 4 base + 2 refiner steps, enough
        for the CUDA graphs of both UNets to be recorded. Other shapes run eager (see _compiled_only).
        `shape` (height, width, num_frames) overrides the default shape (the CPU tests use small ones).
        """
        from schemas import IMAGE_FIELDS, VIDEO_FIELDS

        start = time.perf_counter()
        self._warming_up = True
        try:
            if mode == "video":
                p = {name: param.default for name, param in VIDEO_FIELDS.items()}
                p.update(prompt="warm-up", seed=0, num_inference_steps=2, **shape)
                self.generate_video(p, Image.new("RGB", (p["width"], p["height"])), lambda *_: None)
            else:
                p = {name: param.default for name, param in IMAGE_FIELDS.items()}
                p.update(prompt="warm-up", seed=0, num_inference_steps=5, refiner_inference_steps=10, **shape)
                self.generate_images(p, None, lambda *_: None)
        finally:
            self._warming_up = False
        seconds = time.perf_counter() - start
        log.info("%s warm-up at %dx%d took %.1f s", mode, p["width"], p["height"], seconds)
        return seconds

    # ------------------------------------------------------------------ LoRAs
    def _use_loras(self, family: str, specs: list[LoraSpec]) -> float:
        """Make exactly the job's LoRAs active in SDXL base or Wan (none: all off); returns seconds spent."""
        if not specs and family not in self._loras:
            return 0.0  # no LoRA ever loaded here: nothing to switch off
        start = time.perf_counter()
        if family == "sdxl" and specs and self.settings.sdxl_fuse_qkv and self.base.unet.original_attn_processors:
            # LoRAs target the separate q/k/v projections; from the first SDXL LoRA job on, they stay unfused.
            log.info("unfusing the SDXL base UNet's QKV projections for LoRAs")
            self.base.unet.unfuse_qkv_projections()
        if family not in self._loras:
            self._loras[family] = (PipelineLoras(self.base, "unet", "the SDXL base model") if family == "sdxl" else
                                   PipelineLoras(self.wan, "transformer", "the Wan2.1 I2V transformer"))
        s = self.settings
        cache = LoraCache(s.lora_cache_dir, s.lora_cache_bytes)
        # Group offload keeps its own copies of the weights, so fused weights would not stay fused.
        fuse = s.lora_fuse and not (family == "wan" and self.placement.wan_profile == "lowvram")
        self._loras[family].apply(
            specs, lambda spec: cache.fetch(spec, max_bytes=s.lora_max_bytes, timeout_s=s.lora_fetch_timeout_s), fuse)
        return time.perf_counter() - start

    # ------------------------------------------------------------------- jobs
    def generate_images(self, p: dict[str, Any], init_image: Image.Image | None,
                        progress: Progress) -> tuple[list[Image.Image], dict[str, float]]:
        """SDXL base + refiner as an ensemble of experts, or refiner img2img when an image is given."""
        load_s = self.prepare("image")
        loras = job_loras(p, self.settings)
        lora_s = self._use_loras("sdxl", loras)
        self.base.scheduler = make_scheduler(p["scheduler"], self.base.scheduler.config)
        self.refiner.scheduler = make_scheduler(p["scheduler"], self.refiner.scheduler.config)
        generator = torch.Generator("cpu").manual_seed(p["seed"])
        common = dict(prompt=p["prompt"], negative_prompt=p["negative_prompt"], guidance_scale=p["guidance_scale"],
                      num_images_per_prompt=p["num_images"], generator=generator)
        start = time.perf_counter()
        what = f"{p['num_images']} image(s) of {p['width']}x{p['height']}"
        oom = _friendly_oom(what, "fewer images or a smaller size")
        with oom, _compiled_only(self.compiled("image") and not self._warming_up):
            if init_image is not None:
                total = int(p["refiner_inference_steps"] * p["strength"])
                with lora_disabled(self.refiner.text_encoder_2):  # shared with the base; LoRAs are base-only
                    images = self.refiner(image=init_image, strength=p["strength"],
                                          num_inference_steps=p["refiner_inference_steps"],
                                          callback_on_step_end=_step_callback(progress, "refine", 0, total),
                                          **common).images
            else:
                base_steps = int(p["num_inference_steps"] * p["high_noise_frac"])
                refiner_steps = p["refiner_inference_steps"] - int(p["refiner_inference_steps"] * p["high_noise_frac"])
                total = base_steps + refiner_steps
                latents = self.base(height=p["height"], width=p["width"], num_inference_steps=p["num_inference_steps"],
                                    denoising_end=p["high_noise_frac"], output_type="latent",
                                    callback_on_step_end=_step_callback(progress, "base", 0, total),
                                    **common).images
                with lora_disabled(self.refiner.text_encoder_2):
                    images = self.refiner(image=latents, num_inference_steps=p["refiner_inference_steps"],
                                          denoising_start=p["high_noise_frac"],
                                          callback_on_step_end=_step_callback(progress, "refine", base_steps, total),
                                          **common).images
        timings = {"load_s": load_s, "inference_s": time.perf_counter() - start}
        return images, timings | ({"lora_s": lora_s} if loras else {})

    def generate_video(self, p: dict[str, Any], image: Image.Image,
                       progress: Progress) -> tuple[np.ndarray, dict[str, float]]:
        """Wan2.1 image-to-video; `image` is already resized to p["width"] x p["height"]."""
        from diffusers import UniPCMultistepScheduler

        load_s = self.prepare("video")
        loras = job_loras(p, self.settings)  # with preset "fast", its step-distilled LoRA first
        lora_s = self._use_loras("wan", loras)
        self.wan.scheduler = UniPCMultistepScheduler.from_config(self.wan.scheduler.config, flow_shift=p["flow_shift"])
        generator = torch.Generator("cpu").manual_seed(p["seed"])
        start = time.perf_counter()
        what = f"{p['num_frames']} frames of {p['width']}x{p['height']}"
        with (_friendly_oom(what, "fewer frames or a smaller size"), _step_cache(self.wan.transformer, p),
              _compiled_only(self.compiled("video") and not self._warming_up)):
            frames = self.wan(
                image=image, prompt=p["prompt"], negative_prompt=p["negative_prompt"], height=p["height"],
                width=p["width"], num_frames=p["num_frames"], num_inference_steps=p["num_inference_steps"],
                guidance_scale=p["guidance_scale"], generator=generator, output_type="np",
                callback_on_step_end=_step_callback(progress, "denoise", 0, p["num_inference_steps"]),
            ).frames[0]
        timings = {"load_s": load_s, "inference_s": time.perf_counter() - start}
        return frames, timings | ({"lora_s": lora_s} if loras else {})


@contextmanager
def _step_cache(transformer: torch.nn.Module, p: dict[str, Any]) -> Iterator[None]:
    """Enable the request's step cache for one job only; always removed afterwards."""
    kind = p.get("step_cache", "off")
    if kind == "off":
        yield
        return
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    config = (FirstBlockCacheConfig(threshold=p["step_cache_threshold"]) if kind == "first_block"
              # Lite mode predicts only proj_out and skips the blocks on predicted steps. Caching every
              # block's attn1/attn2/ffn outputs instead ran out of memory on an 80 GB H100 at 480x832x33
              # (Taylor factors for 120 modules x cond/uncond); diffusers' default patterns match no Wan module.
              else TaylorSeerCacheConfig(taylor_factors_dtype=transformer.dtype, use_lite_mode=True))
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


def _compiled_only(enabled: bool):
    """Within a user job, code the warm-up did not compile runs eager instead of compiling.

    Compiling takes minutes (SDXL's whole UNets 3-4.5, Wan's float8 blocks up to 10 on an H100): a
    request at another size, with several images or with unfused LoRAs (new modules) would stall on
    it. So only the warmed-up shapes run compiled. Off during warm_up (whose first compile this
    stance would skip too) and with the model's *_COMPILE switch off.
    """
    return torch.compiler.set_stance("eager_on_recompile") if enabled else nullcontext()


def _fp8_capable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _quantize_fp8(transformer: torch.nn.Module) -> None:
    """Float8 weights and dynamic float8 activations (per row) for the transformer blocks' linears.

    The embedders and the output projection stay in bf16: they are small and most sensitive.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn.startswith("blocks."))


def _step_callback(progress: Progress, phase: str, offset: int, total: int):
    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
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
