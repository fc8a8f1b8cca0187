"""SDXL base + refiner as an ensemble of experts (worker-sdxl's model), or refiner img2img from an input image.

Loads once (fp16 with the fp16-fix VAE on a GPU, float32 on CPU: the same code), optionally compiles
each UNet whole with CUDA graphs (SDXL_COMPILE), and generates one job at a time.
"""

from __future__ import annotations

import logging
import time

import torch
from PIL import Image

import weights
from loras import PipelineLoras, lora_disabled
from models.base import Cancelled, Model, Progress, free_memory, friendly_oom, step_callback
from schemas import SCHEDULERS, ImageJob, validate_input
from settings import Settings

log = logging.getLogger("worker")


def make_scheduler(name: str, config: dict) -> object:
    """A fresh scheduler per job (schedulers carry per-run state), built from the model's config."""
    import diffusers

    cls, overrides = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config, **overrides)


class SdxlModel(Model):
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
        folder = {name: weights.local_folder(name, location, s.weights_download, s.model_dir) for name, location in
                  (("sdxl-vae", s.sdxl_vae_id), ("sdxl-base", s.sdxl_model_id), ("sdxl-refiner", s.sdxl_refiner_id))}
        vae = AutoencoderKL.from_pretrained(folder["sdxl-vae"], dtype=dtype, local_files_only=True)
        base = StableDiffusionXLPipeline.from_pretrained(
            folder["sdxl-base"], vae=vae, dtype=dtype, variant="fp16", use_safetensors=True, add_watermarker=False,
            local_files_only=True)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder["sdxl-refiner"], vae=vae, text_encoder_2=base.text_encoder_2, dtype=dtype, variant="fp16",
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
        refine = step_callback(progress, "refine", job.base_steps, total, cancelled)
        start = time.perf_counter()
        oom = friendly_oom(f"{job.num_images} image(s) of {job.width}x{job.height}", "fewer images or a smaller size")
        with oom, self._stance():
            if init_image is None:
                latents = self.base(height=job.height, width=job.width, num_inference_steps=job.num_inference_steps,
                                    denoising_end=job.high_noise_frac, output_type="latent",
                                    callback_on_step_end=step_callback(progress, "base", 0, total, cancelled),
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
