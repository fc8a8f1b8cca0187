"""The request contract: every input field of both modes, declared once, and the one check of a job.

INPUT_SCHEMA maps each mode ("image", "video") to its fields. Each field carries its type,
default, bounds or choices and a one-sentence description. `validate_input(raw, settings)`
enforces all of them itself (runpod's rp_validator skips constraints whenever a value has the
type of the field's default) and every rule that involves several fields or the worker's
limits, in the order a reader expects, and returns a frozen `ImageJob` or `VideoJob` with the
preset applied and the LoRAs resolved. Rules that need the input image's size live in jobs.py
(`size_image_job` / `size_video_job`), applied once the image is fetched. Every refusal is an
`InputError` whose one sentence names the field, the value received and what is allowed.
The README parameter tables are generated from this module (`python schemas.py`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

from errors import InputError, shorten
from fields import Param, coerce, kind, num
from inline import (
    MIN_IMAGE_BITS_PER_PIXEL,
    MIN_VIDEO_BITS_PER_PIXEL,
    inline_bytes,
    inline_fix,
    inline_limit,
    video_bytes,
)
from lora_source import LoraSpec, parse_source
from settings import Settings

MODES = ("image", "video")
# worker-sdxl's seven schedulers plus two common modern ones, each applied to base and refiner: the name a
# request gives -> diffusers' scheduler class and the options that make it that sampler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "KLMS": ("LMSDiscreteScheduler", {}),
    "K_EULER": ("EulerDiscreteScheduler", {}),
    "K_EULER_ANCESTRAL": ("EulerAncestralDiscreteScheduler", {}),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}),
    "DPMSolverSinglestep": ("DPMSolverSinglestepScheduler", {}),
    "DPMSolverMultistep_Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
# Wan2.1's official negative prompt (shared_config.sample_neg_prompt); UMT5 reads Chinese.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
VIDEO_MAX_AREA = 480 * 832  # Wan2.1-I2V-480P's training area; derived sizes stay inside it
IMAGE_SIDES = (128, 2048)
VIDEO_SIDES = (64, 1280)
MAX_SEED = 2**32 - 1
# A 20 MB image as base64 is ~27 M characters; anything longer is refused before decoding.
MAX_IMAGE_URL_CHARS = 28_000_000
MAX_PROMPT_CHARS = 2_000
MAX_LORAS = 4  # LoRAs per request (the video preset "fast" may add its own on top)
LORA_SCALE_LIMIT = 4.0
# Video presets: the defaults they change. Fields the request gives explicitly always win.
# "fast" follows lightx2v's Wan2.1-I2V-14B-480P StepDistill-CfgDistill recipe: 4 steps, no CFG, shift 5.
VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    "quality": {},
    "fast": {"num_inference_steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0},
}


# Fields both modes share, declared once.
MODE = Param(str, "What to generate: SDXL images or a Wan2.1 image-to-video clip.", default="image", choices=MODES)
SEED = Param(int, "Random seed; the same seed and inputs give the same output. Random when absent (returned).",
             minimum=0, maximum=MAX_SEED)
OUTPUT = Param(str, "Where results go: 'auto' uploads to the bucket when one is configured, else inline base64.",
               default="auto", choices=("auto", "base64", "s3"))
LORA_FIELDS: dict[str, Param] = {
    "path": Param(str, "An http(s) URL of a .safetensors file, a Hugging Face repo id ('owner/name', optionally "
                       "followed by '/file.safetensors'), or an absolute path under the model cache or /runpod-volume.",
                  required=True, max_length=2_048, names_file=True),
    "scale": Param(float, "Strength of the LoRA.", default=1.0, minimum=-LORA_SCALE_LIMIT, maximum=LORA_SCALE_LIMIT),
    "weight_name": Param(str, "File inside a hub repo given as 'owner/name'; pytorch_lora_weights.safetensors "
                              "when absent.", max_length=512, names_file=True),
}
LORAS = Param(list, "LoRA adapters applied to this job only (see 'LoRAs' below); each entry is "
                    "{\"path\": ..., \"scale\": 1.0}.", items=LORA_FIELDS, max_items=MAX_LORAS)

IMAGE_FIELDS: dict[str, Param] = {
    "mode": MODE,
    "prompt": Param(str, "Text prompt; required unless image_url is given.", max_length=MAX_PROMPT_CHARS),
    "negative_prompt": Param(str, "What the image should not show.", max_length=MAX_PROMPT_CHARS),
    "height": Param(int, "Image height in pixels (with image_url: the output keeps the input's aspect ratio at "
                         "height x width pixels).", default=1024, minimum=IMAGE_SIDES[0], maximum=IMAGE_SIDES[1],
                    multiple_of=8),
    "width": Param(int, "Image width in pixels.", default=1024, minimum=IMAGE_SIDES[0], maximum=IMAGE_SIDES[1],
                   multiple_of=8),
    "seed": SEED,
    "scheduler": Param(str, "Sampler used by both base and refiner.", default="DDIM", choices=tuple(SCHEDULERS)),
    "num_inference_steps": Param(int, "Denoising steps of the base model's schedule (at least 2: the base "
                                      "model runs the first high_noise_frac of them).", default=25,
                                 minimum=2, maximum=150),
    "refiner_inference_steps": Param(int, "Denoising steps of the refiner's schedule.", default=50,
                                     minimum=1, maximum=150),
    "guidance_scale": Param(float, "Classifier-free guidance; higher follows the prompt more closely.",
                            default=7.5, minimum=0, maximum=30),
    "strength": Param(float, "How much the refiner changes an image_url input (img2img).", default=0.3,
                      minimum=0, maximum=1, exclusive_minimum=True),
    "image_url": Param(str, "Start image for refiner img2img: http(s) URL, data URI or bare base64.",
                       max_length=MAX_IMAGE_URL_CHARS),
    "num_images": Param(int, "Images per request.", default=1, minimum=1, maximum=4),
    "high_noise_frac": Param(float, "Fraction of the schedule run by the base model before the refiner takes over.",
                             default=0.8, minimum=0, maximum=1, exclusive_minimum=True, exclusive_maximum=True),
    "loras": LORAS,
    "output": OUTPUT,
}

VIDEO_FIELDS: dict[str, Param] = {
    "mode": MODE,
    "image_url": Param(str, "First frame: http(s) URL, data URI or bare base64.", required=True,
                       max_length=MAX_IMAGE_URL_CHARS),
    "prompt": Param(str, "What happens in the video.", required=True, max_length=MAX_PROMPT_CHARS),
    "negative_prompt": Param(str, "What the video should not show; defaults to Wan2.1's recommended negative prompt.",
                             default=WAN_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS),
    "num_frames": Param(int, "Frames in the video (4k+1; 81 is Wan2.1's trained length).", default=81,
                        minimum=5, maximum=161, multiple_of=4, remainder=1),
    "fps": Param(int, "Frames per second of the MP4 (16 is Wan2.1's native rate).", default=16, minimum=1, maximum=60),
    "guidance_scale": Param(float, "Classifier-free guidance; 1.0 skips the unconditional pass.", default=5.0,
                            minimum=1, maximum=20),
    "num_inference_steps": Param(int, "Denoising steps (40 is the official I2V setting).", default=40,
                                 minimum=1, maximum=100),
    "flow_shift": Param(float, "Flow-matching schedule shift (3.0 for 480P).", default=3.0, minimum=0.5, maximum=20),
    "step_cache": Param(str, "Opt-in step caching that reuses transformer work across steps (faster; its quality "
                             "is unmeasured without real weights).", default="off",
                        choices=("off", "first_block", "taylorseer")),
    "step_cache_threshold": Param(float, "first_block: how different the first block's output may be before the "
                                         "rest is recomputed; higher is faster.", default=0.05,
                                  minimum=0, maximum=1, exclusive_minimum=True),
    "seed": SEED,
    "height": Param(int, "Video height; when height and width are absent they follow the image's aspect ratio "
                         "inside 480x832; when given, the image is scaled and center-cropped to fill them.",
                    minimum=VIDEO_SIDES[0], maximum=VIDEO_SIDES[1], multiple_of=16),
    "width": Param(int, "Video width; give both height and width or neither.", minimum=VIDEO_SIDES[0],
                   maximum=VIDEO_SIDES[1], multiple_of=16),
    "preset": Param(str, "'quality' uses the defaults above; 'fast' adds a step-distilled LoRA (WAN_FAST_LORA, or "
                         "the request's loras) and defaults to 4 steps, guidance_scale 1.0 and flow_shift 5.0; "
                         "fields given explicitly still win.", default="quality", choices=tuple(VIDEO_PRESETS)),
    "loras": LORAS,
    "output": OUTPUT,
}

INPUT_SCHEMA: dict[str, dict[str, Param]] = {"image": IMAGE_FIELDS, "video": VIDEO_FIELDS}


def _resolve_loras(entries: list[dict[str, Any]], preset: str | None, settings: Settings) -> tuple[LoraSpec, ...]:
    """The job's LoRAs in order: the video preset "fast" puts its step-distilled LoRA first.

    With preset "fast", WAN_FAST_LORA (scale 1.0) is added unless the request lists the same
    file (then the request's scale applies). Without WAN_FAST_LORA the request's `loras` are
    taken as the step-distilled LoRA(s); with neither, "fast" is refused.
    """
    specs = [parse_source(entry["path"], f"Field 'loras[{i}].path'", settings.lora_roots, entry.get("weight_name"),
                          entry["scale"]) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.key in seen:
            raise InputError(f"{spec.label} repeats the LoRA of loras[{seen[spec.key]}], {spec.shown}; list each "
                             f"LoRA once and set its scale.")
        seen[spec.key] = i
    if preset == "fast":
        if settings.wan_fast_lora:
            fast = parse_source(settings.wan_fast_lora, "WAN_FAST_LORA", settings.lora_roots)
            if fast.key not in seen:
                specs.insert(0, fast)
        elif not specs:
            raise InputError("Field 'preset' is 'fast', which needs a step-distilled LoRA, but this worker has no "
                             "WAN_FAST_LORA configured; send one in 'loras' (for example lightx2v's Wan2.1 I2V 480P "
                             "StepDistill-CfgDistill LoRA) or ask for preset 'quality'.")
    return tuple(specs)


# ------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class ImageJob:
    """A checked SDXL job: base + refiner as an ensemble of experts, or refiner img2img with image_url."""

    prompt: str | None
    negative_prompt: str | None
    height: int
    width: int
    seed: int
    scheduler: str
    num_inference_steps: int
    refiner_inference_steps: int
    guidance_scale: float
    strength: float
    image_url: str | None
    num_images: int
    high_noise_frac: float
    loras: tuple[LoraSpec, ...]
    output: str
    mode: str = "image"

    @property
    def base_steps(self) -> int:
        """Steps the base model runs before the refiner takes over (as counted for progress)."""
        return 0 if self.image_url else int(self.num_inference_steps * self.high_noise_frac)

    @property
    def refiner_steps(self) -> int:
        if self.image_url:
            return int(self.refiner_inference_steps * self.strength)
        return self.refiner_inference_steps - int(self.refiner_inference_steps * self.high_noise_frac)


@dataclass(frozen=True)
class VideoJob:
    """A checked Wan2.1 image-to-video job; height and width are None until sized from the input image."""

    image_url: str
    prompt: str
    negative_prompt: str
    num_frames: int
    fps: int
    guidance_scale: float
    num_inference_steps: int
    flow_shift: float
    step_cache: str
    step_cache_threshold: float
    seed: int
    height: int | None
    width: int | None
    preset: str
    loras: tuple[LoraSpec, ...]
    output: str
    mode: str = "video"

    @property
    def tokens(self) -> int:
        """Transformer sequence length: latent frames x (H/16) x (W/16)."""
        return ((self.num_frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16)


Job = ImageJob | VideoJob


def validate_input(raw: Any, settings: Settings | None = None) -> Job:
    """Check a job's input against the schema and this worker's settings; returns the typed job.

    The order: the input's shape, then each field's type and bounds, then the preset, then the
    bucket for output 's3', the rules between fields with the worker's limits, then the LoRAs. Raises
    InputError with one sentence on the first problem found.
    """
    settings = settings or Settings()
    if not isinstance(raw, dict):
        raise InputError(f"The job input must be a JSON object, got {kind(raw)} {shorten(raw)}.")
    mode = raw.get("mode") if raw.get("mode") is not None else "image"
    coerce("mode", MODE, mode)
    schema = INPUT_SCHEMA[mode]
    unknown = sorted(k for k in raw if k not in schema)
    if unknown:
        raise InputError(f"Field {shorten(unknown[0])} is not accepted in mode '{mode}'; "
                         f"allowed fields are: {', '.join(schema)}.")
    p: dict[str, Any] = {}
    for name, param in schema.items():
        value = raw.get(name)
        if value is None:
            if param.required:
                raise InputError(f"Field '{name}' is required in mode '{mode}' and must be {param.allowed()}.")
            p[name] = [] if param.type is list else param.default
        else:
            p[name] = coerce(name, param, value)
    # A preset changes defaults only: a field the request gives keeps its value.
    for name, value in VIDEO_PRESETS.get(p.get("preset"), {}).items():
        if raw.get(name) is None:
            p[name] = value
    if p["seed"] is None:
        p["seed"] = secrets.randbelow(MAX_SEED + 1)
    if p["output"] == "s3" and settings.bucket is None:
        raise InputError("Field 'output' is 's3' but no bucket is configured (BUCKET_ENDPOINT_URL, "
                         "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY); ask for 'auto' or 'base64'.")
    if mode == "video":
        job = VideoJob(**(p | {"loras": ()}))
        _check_video(job, settings)
    else:
        job = ImageJob(**(p | {"loras": ()}))
        _check_image(job, settings, with_loras=bool(p["loras"]))
    # Last: a LoRA path is checked (and the fast preset's LoRA added) only for an otherwise valid job.
    return replace(job, loras=_resolve_loras(p["loras"], p.get("preset"), settings))


def _check_image(job: ImageJob, settings: Settings, with_loras: bool) -> None:
    if not job.prompt and not job.image_url:
        raise InputError("Field 'prompt' is required in mode 'image' unless image_url is given.")
    if job.image_url and with_loras:
        raise InputError("Field 'loras' applies to the SDXL base model, which does not run when image_url is given "
                         "(img2img runs only the refiner); send loras without image_url, or image_url without loras.")
    if job.image_url:
        if job.refiner_steps < 1:
            raise InputError(f"Field 'strength' is {num(job.strength)}, which with refiner_inference_steps="
                             f"{job.refiner_inference_steps} leaves no refiner step; raise either so that their "
                             f"product is at least 1.")
    else:
        # The refiner always keeps a step: high_noise_frac < 1 leaves it at least one.
        if job.base_steps < 1:
            raise InputError(f"Field 'high_noise_frac' is {num(job.high_noise_frac)}, which with "
                             f"num_inference_steps={job.num_inference_steps} leaves the base model no step; "
                             f"raise either so that their product is at least 1.")
    _check_pixels(job, settings)


def _check_pixels(job: ImageJob, settings: Settings) -> None:
    pixels = job.num_images * job.height * job.width
    if pixels > settings.max_image_pixels:
        raise InputError(f"Fields num_images x height x width ask for {pixels:,} pixels; this worker allows at "
                         f"most {settings.max_image_pixels:,} per job (MAX_IMAGE_PIXELS), so ask for fewer or "
                         f"smaller images.")
    if _inline(job, settings):
        bits = inline_bytes(settings.max_inline_chars // job.num_images, "image/jpeg") * 8 / (job.height * job.width)
        if bits < MIN_IMAGE_BITS_PER_PIXEL:
            raise InputError(f"Fields num_images x height x width ask for {pixels:,} pixels, too many for "
                             f"{inline_limit(settings.max_inline_chars)}: it leaves {bits:.2f} bits per pixel where a "
                             f"JPEG of good quality needs at least {MIN_IMAGE_BITS_PER_PIXEL:g}; "
                             f"{inline_fix(settings.bucket)}, or ask for fewer or smaller images.")


def _check_video(job: VideoJob, settings: Settings) -> None:
    if not job.prompt.strip():
        got = "an empty string" if not job.prompt else f"{shorten(job.prompt)}, which is only white space"
        raise InputError(f"Field 'prompt' must describe the video, got {got}.")
    if (job.height is None) != (job.width is None):
        given = "height" if job.height is not None else "width"
        raise InputError(f"Field '{given}' was given without its partner; send both height and width, "
                         f"or neither to follow the image's aspect ratio.")
    if job.step_cache != "off" and settings.wan_compile:
        # The cache hooks wrap the transformer blocks, which torch.compile(fullgraph=True) cannot trace.
        raise InputError(f"Field 'step_cache' is {job.step_cache!r}, but this worker runs with WAN_COMPILE=1, "
                         f"which step caching cannot be combined with; send 'off'.")
    if job.step_cache == "first_block" and settings.num_gpus > 1:
        # Each GPU would decide alone, from its own part of the tokens, whether to skip the blocks.
        raise InputError(f"Field 'step_cache' is 'first_block', which cannot run on this worker's "
                         f"{settings.num_gpus} GPUs (each would decide alone which steps to skip); send "
                         f"'off' or 'taylorseer'.")
    if job.height is not None:
        check_tokens(job, settings)  # before anything is fetched


def check_tokens(job: VideoJob, settings: Settings) -> None:
    if job.tokens > settings.max_video_tokens:
        raise InputError(f"Fields num_frames={job.num_frames}, height={job.height}, width={job.width} make "
                         f"{job.tokens:,} transformer tokens; this worker allows at most "
                         f"{settings.max_video_tokens:,} (MAX_VIDEO_TOKENS, about 1.5x a 480x832 81-frame video) "
                         f"to stay within GPU memory and time, so ask for fewer frames or a smaller size.")
    if _inline(job, settings):
        budget = video_bytes(inline_bytes(settings.max_inline_chars, "video/mp4"), job.num_frames)
        bits = budget * 8 / (job.num_frames * job.height * job.width)
        if bits < MIN_VIDEO_BITS_PER_PIXEL:
            raise InputError(f"Fields num_frames={job.num_frames}, height={job.height}, width={job.width} make a video "
                             f"too large for {inline_limit(settings.max_inline_chars)}: it leaves {bits:.3f} bits per "
                             f"pixel of each frame where H.264 needs at least {MIN_VIDEO_BITS_PER_PIXEL:g}; "
                             f"{inline_fix(settings.bucket)}, or ask for fewer frames or a smaller size.")


def _inline(job: Job, settings: Settings) -> bool:
    """Whether the job's result is meant to come back inline (an upload that fails falls back to inline too)."""
    return settings.bucket is None or job.output == "base64"


def markdown_tables() -> str:
    """The README's parameter tables, one per mode, generated from INPUT_SCHEMA."""
    out = []
    for mode, fields in INPUT_SCHEMA.items():
        out.append(f"#### `{mode}` mode\n")
        out.append("| field | type | default | allowed | description |")
        out.append("|---|---|---|---|---|")
        for name, p in fields.items():
            if p.required:
                default = "**required**"
            elif name == "negative_prompt" and mode == "video":
                default = "Wan2.1's negative prompt"
            else:
                default = "random" if name == "seed" else ("none" if p.default is None else f"`{p.default!r}`")
            out.append(f"| `{name}` | {p.type.__name__} | {default} | {p.allowed()} | {p.description} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_tables())
