"""Plain diffusers, as the model cards run it: the reference every worker figure is compared with.

from_pretrained in the model card's dtypes, .to("cuda"), pipe(...), export to MP4 / PNG. bench.py imports
it and runs the same jobs in the same process; cold_start.py runs it alone in a fresh process:

    python benchmarks/plain.py --models /tmp/bench-models --image 832x480 --frames 81 --steps 2 --out r.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3


def _device() -> tuple[str, object]:
    import torch

    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def load_wan(model_dir: Path):
    """Wan2.1-I2V-14B-480P-Diffusers' model card: image encoder and VAE in float32, the rest bf16, .to('cuda')."""
    import torch
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    device, dtype = _device()
    image_encoder = CLIPVisionModel.from_pretrained(str(model_dir), subfolder="image_encoder", dtype=torch.float32)
    vae = AutoencoderKLWan.from_pretrained(str(model_dir), subfolder="vae", dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(str(model_dir), vae=vae, image_encoder=image_encoder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def fuse_lora(pipe, path: Path) -> None:
    """A step-distilled LoRA as its model card loads it: load_lora_weights, then fuse_lora."""
    pipe.load_lora_weights(str(path), adapter_name="fast")
    pipe.fuse_lora()


def load_sdxl(models: Path):
    """The SDXL 1.0 model card: base + refiner sharing text_encoder_2 and VAE, fp16 variant, .to('cuda')."""
    import torch
    from diffusers import DiffusionPipeline

    device, _ = _device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    base = DiffusionPipeline.from_pretrained(str(models / "sdxl-base"), dtype=dtype, variant="fp16",
                                             use_safetensors=True).to(device)
    refiner = DiffusionPipeline.from_pretrained(str(models / "sdxl-refiner"), text_encoder_2=base.text_encoder_2,
                                                vae=base.vae, dtype=dtype, variant="fp16", use_safetensors=True)
    for pipe in (base, refiner.to(device)):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


class Steps:
    """callback_on_step_end that stamps each step's end (GPU synchronized): seconds per step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def stamp(self) -> None:
        sync()
        self.stamps.append(time.perf_counter())

    def __call__(self, pipe, step, timestep, kwargs):
        self.stamp()
        return kwargs

    def s_per_step(self) -> float | None:
        """Median of steps 2..N (step ends apart): the first step's one-time costs stay out."""
        diffs = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return statistics.median(diffs) if diffs else None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()


def run_video(pipe, image, *, prompt: str, negative_prompt: str | None, frames: int, steps: int, guidance: float,
              seed: int, flow_shift: float = 3.0, size: tuple[int, int] | None = None) -> dict:
    """One I2V job, request to MP4 file; size (width, height) or None for the model card's sizing recipe."""
    import numpy as np
    import torch
    from diffusers import UniPCMultistepScheduler
    from diffusers.utils import export_to_video

    reset_peak()
    start = time.perf_counter()
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    if size is None:  # the model card: max area 480x832, multiples of the VAE factor x the patch size
        max_area, aspect = 480 * 832, image.height / image.width
        mod = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        size = (round(np.sqrt(max_area / aspect)) // mod * mod, round(np.sqrt(max_area * aspect)) // mod * mod)
    steps_cb = Steps()
    video = pipe(image=image.resize(size), prompt=prompt, negative_prompt=negative_prompt, width=size[0],
                 height=size[1], num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=steps_cb).frames[0]
    with tempfile.TemporaryDirectory() as tmp:
        export_to_video(video, str(Path(tmp) / "video.mp4"), fps=16)
    return {"e2e_s": time.perf_counter() - start, "s_per_step": steps_cb.s_per_step(), "steps": steps,
            "width": size[0], "height": size[1], "frames": frames, "peak_gib": peak_gib()}


def run_image(base, refiner, *, prompt: str, width: int, height: int, steps: int, refiner_steps: int,
              high_noise_frac: float, guidance: float, seed: int) -> dict:
    """The SDXL model card's ensemble of experts: base to high_noise_frac, refiner from there; PNG encoded."""
    import torch

    reset_peak()
    start = time.perf_counter()
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = base(prompt=prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                   denoising_end=high_noise_frac, output_type="latent", generator=generator).images
    image = refiner(prompt=prompt, num_inference_steps=refiner_steps, denoising_start=high_noise_frac,
                    guidance_scale=guidance, image=latents, generator=generator).images[0]
    image.save(io.BytesIO(), format="PNG")
    sync()
    return {"e2e_s": time.perf_counter() - start, "peak_gib": peak_gib()}


def main(argv: list[str] | None = None) -> int:
    """One video job in this (fresh) process: cold_start.py's plain-diffusers reference."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="folder holding wan-i2v/")
    p.add_argument("--image", default="832x480", help="input image WxH; the video size follows the model card")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", help="video WxH (default: sized from the image as the model card does)")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    from bench import SEED, VIDEO_PROMPT, input_image

    start = time.perf_counter()
    pipe = load_wan(args.models / "wan-i2v")
    load_s = time.perf_counter() - start
    width, height = (int(v) for v in args.image.split("x"))
    # The negative prompt's text costs nothing extra: both prompts are padded to 512 tokens.
    rec = run_video(pipe, input_image(width, height), prompt=VIDEO_PROMPT, negative_prompt=None,
                    frames=args.frames, steps=args.steps, guidance=5.0, seed=SEED,
                    size=tuple(int(v) for v in args.size.split("x")) if args.size else None)
    rec.update(load_s=load_s, finished_at=time.time())  # cold_start.py times from its own start
    text = json.dumps(rec)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
