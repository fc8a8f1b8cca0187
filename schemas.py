"""The request contract: every input field of both modes, declared once, and its validation.

INPUT_SCHEMA maps each mode ("image", "video") to its fields. Each field carries its type,
default, bounds or choices and a one-sentence description; `validate_input` enforces all of
them itself (runpod's rp_validator skips constraints whenever a value has the default's
type, see DESIGN.md section 3) and raises `InputError` with one sentence naming the field,
the value received and what is allowed. The README parameter tables are generated from
this module (`python schemas.py`) and a test checks they match.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

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
                  required=True, max_length=2_048),
    "scale": Param(float, "Strength of the LoRA.", default=1.0, minimum=-LORA_SCALE_LIMIT, maximum=LORA_SCALE_LIMIT),
    "weight_name": Param(str, "File inside a hub repo given as 'owner/name'; pytorch_lora_weights.safetensors "
                              "when absent.", max_length=512),
}
LORAS = Param(list, "LoRA adapters applied to this job only (see 'LoRAs' below); each entry is "
                    "{\"path\": ..., \"scale\": 1.0}.", items=LORA_FIELDS, max_items=MAX_LORAS)

IMAGE_FIELDS: dict[str, Param] = {
    "mode": MODE,
    "prompt": Param(str, "Text prompt; required unless image_url is given.", max_length=MAX_PROMPT_CHARS),
    "negative_prompt": Param(str, "What the image should not show.", max_length=MAX_PROMPT_CHARS),
    "height": Param(int, "Image height in pixels.", default=1024, minimum=128, maximum=2048, multiple_of=8),
    "width": Param(int, "Image width in pixels.", default=1024, minimum=128, maximum=2048, multiple_of=8),
    "seed": SEED,
    "scheduler": Param(str, "Sampler used by both base and refiner.", default="DDIM", choices=SCHEDULERS),
    "num_inference_steps": Param(int, "Denoising steps of the base model's schedule.", default=25,
                                 minimum=1, maximum=150),
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
                         "inside 480x832.", minimum=64, maximum=1280, multiple_of=16),
    "width": Param(int, "Video width; give both height and width or neither.", minimum=64, maximum=1280,
                   multiple_of=16),
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
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _coerce(name: str, param: Param, value: Any) -> Any:
    """Check one field's type and bounds; returns the value in its Python type."""
    def bad() -> InputError:
        return InputError(f"Field '{name}' must be {param.allowed()}, got {_kind(value)} {shorten(value)}.")

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
            raise InputError(f"Field '{where}' must be an object with {', '.join(param.items)}, got {_kind(item)} "
                             f"{shorten(item)}.")
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


def validate_input(raw: Any) -> dict[str, Any]:
    """Validate a job's input; returns every field of its mode with defaults filled in.

    Raises InputError with a one-sentence message on the first problem found.
    """
    if not isinstance(raw, dict):
        raise InputError(f"The job input must be a JSON object, got {_kind(raw)} {shorten(raw)}.")
    mode = raw.get("mode") if raw.get("mode") is not None else "image"
    _coerce("mode", MODE, mode)
    fields = INPUT_SCHEMA[mode]

    unknown = sorted(k for k in raw if k not in fields)
    if unknown:
        raise InputError(f"Field {shorten(unknown[0])} is not accepted in mode '{mode}'; "
                         f"allowed fields are: {', '.join(fields)}.")

    params: dict[str, Any] = {}
    for name, param in fields.items():
        value = raw.get(name)
        if value is None:
            if param.required:
                raise InputError(f"Field '{name}' is required in mode '{mode}' and must be {param.allowed()}.")
            params[name] = [] if param.type is list else param.default
        else:
            params[name] = _coerce(name, param, value)
    # A preset changes defaults only: a field the request gives keeps its value.
    for name, value in VIDEO_PRESETS.get(params.get("preset"), {}).items():
        if raw.get(name) is None:
            params[name] = value
    _check_combinations(mode, params)
    if params["seed"] is None:
        params["seed"] = secrets.randbelow(MAX_SEED + 1)
    return params


def _check_combinations(mode: str, p: dict[str, Any]) -> None:
    """Rules that involve more than one field."""
    if mode == "video":
        if not p["prompt"].strip():
            raise InputError("Field 'prompt' must describe the video, got an empty string.")
        if (p["height"] is None) != (p["width"] is None):
            given = "height" if p["height"] is not None else "width"
            raise InputError(f"Field '{given}' was given without its partner; send both height and width, "
                             f"or neither to follow the image's aspect ratio.")
        return
    if not p["prompt"] and not p["image_url"]:
        raise InputError("Field 'prompt' is required in mode 'image' unless image_url is given.")
    if p["image_url"] and p["loras"]:
        raise InputError("Field 'loras' applies to the SDXL base model, which does not run when image_url is given "
                         "(img2img runs only the refiner); send loras without image_url, or image_url without loras.")
    if p["image_url"]:
        if int(p["refiner_inference_steps"] * p["strength"]) < 1:
            raise InputError(f"Field 'strength' is {_num(p['strength'])}, which with refiner_inference_steps="
                             f"{p['refiner_inference_steps']} leaves no refiner step; raise either so that their "
                             f"product is at least 1.")
    else:
        if int(p["num_inference_steps"] * p["high_noise_frac"]) < 1:
            raise InputError(f"Field 'high_noise_frac' is {_num(p['high_noise_frac'])}, which with "
                             f"num_inference_steps={p['num_inference_steps']} leaves the base model no step; "
                             f"raise either so that their product is at least 1.")
        refiner = p["refiner_inference_steps"]
        if refiner - int(refiner * p["high_noise_frac"]) < 1:
            raise InputError(f"Field 'high_noise_frac' is {_num(p['high_noise_frac'])}, which with "
                             f"refiner_inference_steps={p['refiner_inference_steps']} leaves the refiner no step; "
                             f"lower it or raise refiner_inference_steps.")


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
