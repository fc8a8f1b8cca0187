"""The request contract: every input field of both modes, declared once, and the one check of a job.

INPUT_SCHEMA maps each mode ("image", "video") to its fields. Each field carries its type,
default, bounds or choices and a one-sentence description. `validate_input(raw, settings)`
enforces all of them itself (runpod's rp_validator skips constraints whenever a value has the
type of the field's default) and every rule that involves several fields or the worker's
limits, in the order a reader expects, and returns a frozen `ImageJob` or `VideoJob` with the
preset applied and the LoRAs resolved. Rules that need the input image's size live in
`size_image_job` / `size_video_job`, called once the image is fetched. Every refusal is an
`InputError` whose one sentence names the field, the value received and what is allowed.
The README parameter tables are generated from this module (`python schemas.py`).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from settings import Settings

MODES = ("image", "video")
# worker-sdxl's seven schedulers plus two common modern ones; each applies to base and refiner.
SCHEDULERS = (
    "DDIM", "PNDM", "KLMS", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep",
    "DPMSolverSinglestep", "DPMSolverMultistep_Karras", "UniPC",
)
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


class InputError(ValueError):
    """A request the worker refuses; str(err) is the one sentence the user sees."""


class ResourceError(RuntimeError):
    """A folder the worker writes (TMPDIR, LORA_CACHE_DIR, ...) cannot take a file: not the request's fault, and the
    next job may well succeed. str(err) is one sentence naming the setting, the folder and the fix (`folder_fault`)."""


@dataclass(frozen=True)
class Param:
    """One input field: what it is, its default and what values are allowed."""

    type: type
    description: str
    default: Any = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    multiple_of: int | None = None
    remainder: int = 0  # with multiple_of: value % multiple_of == remainder (4k+1 frames)
    choices: tuple | None = None
    max_length: int | None = None
    items: dict[str, Param] | None = None  # with type list: each entry is an object with these fields
    max_items: int | None = None
    names_file: bool = False  # str: the value becomes part of a file path, which cannot hold a NUL

    def allowed(self) -> str:
        """What values are allowed, as words; used in errors and in the README tables."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type is list:
            keys = [f"{key} ({sub.allowed()}" + (", required)" if sub.required else
                                                 ")" if sub.default is None else f", default {_num(sub.default)})")
                    for key, sub in self.items.items()]
            return f"a list of at most {self.max_items} objects: " + "; ".join(keys)
        words = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[self.type]
        parts = [words]
        if self.minimum is not None and self.maximum is not None:
            lo = "above" if self.exclusive_minimum else "from"
            hi = "below" if self.exclusive_maximum else "to"
            parts.append(f"{lo} {_num(self.minimum)} {hi} {_num(self.maximum)}")
        elif self.minimum is not None:
            parts.append(f"{'above' if self.exclusive_minimum else 'of at least'} {_num(self.minimum)}")
        if self.multiple_of and self.remainder:
            parts.append(f"of the form {self.multiple_of}k+{self.remainder}")
        elif self.multiple_of:
            parts.append(f"that is a multiple of {self.multiple_of}")
        if self.max_length:
            parts.append(f"of at most {self.max_length:,} characters")
        return " ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


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
    "scheduler": Param(str, "Sampler used by both base and refiner.", default="DDIM", choices=SCHEDULERS),
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


def shorten(value: Any, limit: int = 60) -> str:
    """A value as the user sent it, cut short so an error never echoes a whole payload."""
    text = repr(value)
    if len(text) <= limit:
        return text
    count = len(value) if isinstance(value, str) else len(text)  # a string's own length, not its repr's
    return f"{text[:limit]}... ({count:,} characters)"


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _received(value: Any) -> str:
    """'string 'abc'', 'number 3', or 'null' (whose repr would only repeat it as None)."""
    return "null" if value is None else f"{_kind(value)} {shorten(value)}"


def _check_text(name: str, param: Param, value: str) -> None:
    """Text the libraries below can take: UTF-8 encodable (JSON can carry a lone UTF-16 surrogate, "\\ud800",
    which tokenizers, file systems and HTTP refuse) and, where it becomes a path, without NUL."""
    if not value.isascii():  # the common case costs nothing, even for 28 M characters of base64
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(f"Field '{name}' must be valid Unicode text, got {shorten(value)}, which holds a lone "
                             f"UTF-16 surrogate ({value[err.start]!r}) at character {err.start + 1}; send whole "
                             f"characters (a complete surrogate pair, or the text as UTF-8).") from None
    if param.names_file and "\0" in value:
        raise InputError(f"Field '{name}' must not hold a NUL character, got {shorten(value)} (NUL at character "
                         f"{value.index(chr(0)) + 1}); no file path can hold one.")


def _coerce(name: str, param: Param, value: Any) -> Any:
    """Check one field's type and bounds; returns the value in its Python type."""
    def bad() -> InputError:
        return InputError(f"Field '{name}' must be {param.allowed()}, got {_received(value)}.")

    if param.type is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON clients often send 25.0
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
    elif param.type is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad()
        value = float(value)
    elif param.type is list:
        if not isinstance(value, list):
            raise bad()
        return _coerce_items(name, param, value)
    elif not isinstance(value, param.type):
        raise bad()
    elif param.type is str:
        _check_text(name, param, value)

    if param.choices is not None and value not in param.choices:
        raise bad()
    if param.max_length is not None and len(value) > param.max_length:
        raise bad()
    if param.minimum is not None and (value <= param.minimum if param.exclusive_minimum else value < param.minimum):
        raise bad()
    if param.maximum is not None and (value >= param.maximum if param.exclusive_maximum else value > param.maximum):
        raise bad()
    if param.multiple_of and value % param.multiple_of != param.remainder:
        raise bad()
    return value


def _coerce_items(name: str, param: Param, value: list) -> list[dict[str, Any]]:
    """A list of objects: its length, then each entry's fields, named like 'loras[1].scale' in errors."""
    if len(value) > param.max_items:
        raise InputError(f"Field '{name}' holds {len(value)} entries; at most {param.max_items} are allowed.")
    entries = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise InputError(f"Field '{where}' must be an object with {', '.join(param.items)}, got "
                             f"{_received(item)}.")
        unknown = sorted(str(k) for k in item if k not in param.items)
        if unknown:
            raise InputError(f"Field '{where}' has the unknown key {shorten(unknown[0])}; allowed keys are: "
                             f"{', '.join(param.items)}.")
        entry = {}
        for key, sub in param.items.items():
            if item.get(key) is None:
                if sub.required:
                    raise InputError(f"Field '{where}.{key}' is required and must be {sub.allowed()}.")
                entry[key] = sub.default
            else:
                entry[key] = _coerce(f"{where}.{key}", sub, item[key])
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------ LoRA sources
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA in a hub repo
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[^\s]+))?$")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a job: where its file is, how strongly it applies, and how errors name it."""

    kind: str  # "url" | "hub" | "local"
    location: str  # the URL, the hub repo id, or the resolved local path
    filename: str | None  # the file inside a hub repo
    scale: float
    label: str  # "Field 'loras[0].path'" or "WAN_FAST_LORA": how messages name where it came from
    shown: str  # the path as given, cut short

    @property
    def key(self) -> str:
        """sha256 of the source: the disk cache's file name and the adapter's identity."""
        return hashlib.sha256(f"{self.kind}\n{self.location}\n{self.filename}".encode()).hexdigest()

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.key[:16]}"

    def names(self) -> str:
        """The start of every error sentence about this LoRA."""
        return f"{self.label} names the LoRA {self.shown}, which"


def parse_source(path: str, label: str, roots: Iterable[str], weight_name: str | None = None,
                 scale: float = 1.0) -> LoraSpec:
    """Check a LoRA path's form (and, for a local file, that it lies inside `roots`); no I/O besides realpath."""
    text = path.strip()
    shown = shorten(text or path, 100)  # a blank path is shown as sent, not as ''
    if re.match(r"^https?://", text, flags=re.I):
        if weight_name:
            raise InputError(f"{label} is a URL, {shown}, so weight_name (which picks a file in a hub repo) must "
                             f"be left out.")
        if not urlparse(text).hostname:
            raise InputError(f"{label} must be an http(s) URL with a host name, got {shown}.")
        return LoraSpec("url", text, None, scale, label, shown)
    if text.startswith("/"):
        if weight_name:
            raise InputError(f"{label} is a local path, {shown}, so weight_name (which picks a file in a hub repo) "
                             f"must be left out.")
        if not text.lower().endswith(".safetensors"):
            raise InputError(f"{label} must name a .safetensors file, got {shown}; pickled .ckpt/.pt/.bin files "
                             f"are not loaded.")
        real = os.path.realpath(text)
        allowed = [os.path.realpath(r) for r in roots]
        if not any(os.path.commonpath([real, r]) == r for r in allowed):
            raise InputError(f"{label} is the local path {shown}, which lies outside the folders LoRAs may be "
                             f"read from ({', '.join(allowed)}); put the file there or send a URL.")
        return LoraSpec("local", real, None, scale, label, shown)
    match = _HUB_ID.match(text)
    if not match:
        raise InputError(f"{label} must be an http(s) URL, a Hugging Face repo id ('owner/name', optionally "
                         f"followed by '/file.safetensors') or an absolute path of a .safetensors file, got {shown}.")
    if not match["file"] and match["repo"].lower().endswith(".safetensors"):
        raise InputError(f"{label} looks like a relative file path, {shown}; a local LoRA needs an absolute path "
                         f"and a hub repo id is 'owner/name'.")
    if match["file"] and weight_name:
        raise InputError(f"{label} names the file {shorten(match['file'], 60)} inside the repo and weight_name "
                         f"names another; give the file in one of them.")
    filename = match["file"] or weight_name or DEFAULT_WEIGHT_NAME
    if ".." in filename.split("/") or filename.startswith("/") or not filename.lower().endswith(".safetensors"):
        raise InputError(f"{label} must name a .safetensors file inside the repo {match['repo']!r}, got "
                         f"{shorten(filename, 60)}.")
    return LoraSpec("hub", match["repo"], filename, scale, label, shown)


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
        raise InputError(f"The job input must be a JSON object, got {_kind(raw)} {shorten(raw)}.")
    mode = raw.get("mode") if raw.get("mode") is not None else "image"
    _coerce("mode", MODE, mode)
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
            p[name] = _coerce(name, param, value)
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
            raise InputError(f"Field 'strength' is {_num(job.strength)}, which with refiner_inference_steps="
                             f"{job.refiner_inference_steps} leaves no refiner step; raise either so that their "
                             f"product is at least 1.")
    else:
        # The refiner always keeps a step: high_noise_frac < 1 leaves it at least one.
        if job.base_steps < 1:
            raise InputError(f"Field 'high_noise_frac' is {_num(job.high_noise_frac)}, which with "
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
        _check_tokens(job, settings)  # before anything is fetched


def _check_tokens(job: VideoJob, settings: Settings) -> None:
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


# ------------------------------------------------------------------------------------ inline results
# A result returned inline (no bucket, or output 'base64') must fit MAX_INLINE_MB as base64; storage.py shrinks one
# that does not (an MP4 re-encoded at a lower bitrate, images as JPEG). What can be decided before generating is:
# a result that would have fewer bits per pixel than these cannot be shrunk to fit at a quality worth sending.
MIN_IMAGE_BITS_PER_PIXEL = 1.0  # about a detailed picture as JPEG at quality 75
MIN_VIDEO_BITS_PER_PIXEL = 0.05  # of each frame: below it H.264 smears, and x264 overshoots so low a rate
MP4_FIXED_BYTES = 1_000  # an MP4's boxes besides its frames (ftyp, moov)
MP4_FRAME_BYTES = 40  # per frame: its index entries and the least x264 spends on one


def _inline(job: Job, settings: Settings) -> bool:
    """Whether the job's result is meant to come back inline (an upload that fails falls back to inline too)."""
    return settings.bucket is None or job.output == "base64"


def inline_bytes(chars: int, mime: str) -> int:
    """The most bytes a data URI of `mime` carries within `chars` characters (base64: 3 bytes in 4 characters)."""
    return max(0, chars - len(f"data:{mime};base64,")) // 4 * 3


def video_bytes(mp4_bytes: int, frames: int) -> int:
    """What an MP4 of `mp4_bytes` has for its H.264 frames, once its boxes are counted."""
    return max(0, mp4_bytes - MP4_FIXED_BYTES - MP4_FRAME_BYTES * frames)


def inline_limit(chars: int) -> str:
    """The limit that applies to inline results, as words: its size, its setting and RunPod's caps."""
    return (f"the {chars:,}-character inline limit (MAX_INLINE_MB={chars / 1e6:g}; RunPod carries 10 MB on /run and "
            f"20 MB on /runsync)")


def inline_fix(bucket: object | None) -> str:
    """How to receive a result too large to return inline."""
    return ("ask for output 'auto' to receive it as a URL from the configured bucket" if bucket else
            "configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to receive it "
            "as a URL")


def fit_area(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """Size with the aspect ratio of width x height and about `area` pixels, each side a multiple.

    This is the recipe of diffusers' Wan I2V example (1280x720 -> 832x464 inside 480x832).
    """
    aspect = height / width
    out_h = round(math.sqrt(area * aspect)) // multiple * multiple
    out_w = round(math.sqrt(area / aspect)) // multiple * multiple
    return out_w, out_h


def _check_derived_size(image_size: tuple[int, int], size: tuple[int, int], sides: tuple[int, int],
                        advice: str) -> None:
    if not all(sides[0] <= side <= sides[1] for side in size):
        raise InputError(f"Field 'image_url' is a {image_size[0]}x{image_size[1]} image whose aspect ratio gives a "
                         f"{size[0]}x{size[1]} result; sides from {sides[0]} to {sides[1]} are allowed, so {advice}.")


def size_image_job(job: ImageJob, image_size: tuple[int, int]) -> ImageJob:
    """img2img keeps the input's aspect ratio at the requested pixel count (multiples of 8 for the VAE)."""
    size = fit_area(*image_size, job.width * job.height, 8)
    advice = "send a less elongated image"
    if IMAGE_SIDES[0] * max(image_size) <= IMAGE_SIDES[1] * min(image_size):  # another pixel count would fit it
        advice += f" or a {'smaller' if max(size) > IMAGE_SIDES[1] else 'larger'} height x width"
    _check_derived_size(image_size, size, IMAGE_SIDES, advice)
    return replace(job, width=size[0], height=size[1])


def size_video_job(job: VideoJob, image_size: tuple[int, int], settings: Settings) -> VideoJob:
    """A video without height/width takes the input's aspect ratio inside 480x832 (multiples of 16)."""
    if job.height is not None:
        return job
    size = fit_area(*image_size, VIDEO_MAX_AREA, 16)
    _check_derived_size(image_size, size, VIDEO_SIDES,
                        "send height and width explicitly or a less elongated image")
    job = replace(job, width=size[0], height=size[1])
    _check_tokens(job, settings)
    return job


# ------------------------------------------------------------------------------------ local folders
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)  # EEXIST: mkdir found a file where the folder should be


def folder_fault(err: OSError, setting: str, folder: str | Path) -> str | None:
    """What stops `folder` (the value of the env var `setting`) taking a file, and the fix, from the OSError a write
    raised: words to end a sentence with. None when the error is not about the folder."""
    where = f"{setting}={str(folder)!r}"
    if err.errno in DISK_FULL:
        return (f"the disk holding {where} is full ({free_mb(folder)} free); free space there or set {setting} to a "
                f"folder on a larger disk")
    if err.errno in _NOT_WRITABLE:
        return f"{where} is not writable ({err.strerror}); set {setting} to a folder this worker can write"
    if err.errno in _NOT_A_FOLDER:
        return f"{where} is not a folder ({first_file(folder)} is a file); set {setting} to a folder"
    if err.errno == errno.ENOENT:
        return f"{where} does not exist; create it or set {setting} to an existing folder"
    return None


def existing_part(folder: str | Path) -> Path:
    """The folder itself, or its nearest ancestor that exists."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def first_file(folder: str | Path) -> str:
    """The file that stands where `folder` or one of its ancestors should be a folder."""
    path = existing_part(folder)
    return str(path) if not path.is_dir() else str(folder)


def free_mb(folder: str | Path) -> str:
    try:
        return f"{shutil.disk_usage(existing_part(folder)).free / 1e6:,.1f} MB"
    except OSError:
        return "unknown space"


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
