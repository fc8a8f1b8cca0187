"""Worker configuration: every environment variable the worker reads, in one place.

`load_settings(env)` is a pure function of a mapping, so tests call it with a plain dict;
the worker calls it once with os.environ at start-up. A broken configuration (for example
a bucket half configured) raises `SettingsError` there, before any job is taken.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

from errors import SettingsError

DEFAULT_SDXL_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_SDXL_REFINER_ID = "stabilityai/stable-diffusion-xl-refiner-1.0"
DEFAULT_SDXL_VAE_ID = "madebyollin/sdxl-vae-fp16-fix"
DEFAULT_WAN_MODEL_ID = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
RUNPOD_LOG_LEVELS = ("NOTSET", "TRACE", "DEBUG", "INFO", "WARN", "ERROR")  # runpod's RunPodLogger accepts these
BUCKET_VARS = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")


@dataclass(frozen=True)
class Bucket:
    """S3-compatible storage for results (RunPod's BUCKET_* convention)."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)  # never printed, not even in a repr
    name: str
    url_expiry_s: int
    region: str = "us-east-1"  # signs requests and presigned URLs (SigV4 scopes them to a region)

    def __repr__(self) -> str:
        return (f"Bucket(endpoint_url={self.endpoint_url!r}, name={self.name!r}, region={self.region!r}, "
                f"url_expiry_s={self.url_expiry_s})")


@dataclass(frozen=True)
class Settings:
    sdxl_model_id: str = DEFAULT_SDXL_MODEL_ID
    sdxl_refiner_id: str = DEFAULT_SDXL_REFINER_ID
    sdxl_vae_id: str = DEFAULT_SDXL_VAE_ID
    wan_model_id: str = DEFAULT_WAN_MODEL_ID
    model_dir: str = "/models"  # MODEL_DIR: weights baked into the image, one folder per model
    weights_download: bool = True  # fetch missing weights from the hub before loading (weights.py)
    preload: tuple[str, ...] = ()  # models loaded at start-up instead of on their first job
    bucket: Bucket | None = None
    # Request guards (hostile or simply too large input), checked before any model work.
    max_video_tokens: int = 49_140  # latent tokens; 480x832x81 is 32,760
    max_image_pixels: int = 4 * 1024 * 1024 * 2  # num_images x height x width
    max_inline_chars: int = 10_000_000  # a result returned as base64 (MAX_INLINE_MB): RunPod carries 10 MB on /run
    max_input_image_bytes: int = 20 * 1024 * 1024
    max_input_image_pixels: int = 40_000_000
    fetch_timeout_s: float = 15.0
    # Speed and memory levers (README "Speed and memory"); each is switchable.
    memory_profile: str = "auto"  # auto | full | offload | lowvram
    wan_fp8: bool = False  # float8 weights+activations for the transformer's block linears (models/float8.py)
    wan_fp8_attention: bool = False  # the blocks' self-attention in float8 (FlashAttention-3, Hopper)
    wan_compile: bool = False  # regional torch.compile of the Wan transformer blocks, warmed up at start
    wan_vae_dtype: str = "float32"  # the model card's; bfloat16 halves the VAE's encode + decode time
    sdxl_compile: bool = False  # whole-UNet torch.compile with CUDA graphs, warmed up at start-up
    # Compiled kernels are kept here (the network volume when mounted) so that an endpoint compiles once.
    compile_cache_dir: str | None = None
    num_gpus: int = 1  # GPUs one worker spreads a video over (context parallelism, parallel.py)
    # runpod's own logger defaults to DEBUG, which prints whole job inputs (megabytes of base64).
    runpod_log_level: str = "INFO"
    # Set by RunPod on its workers; without it the worker runs locally (test_input / local API).
    on_runpod: bool = False
    local_output_dir: str = "outputs"  # where local test runs write their media
    mp4_preset: str = "veryfast"  # x264 speed preset; at CRF 18 slower presets mostly buy smaller files
    # LoRAs (loras.py): downloads are cached on disk by source; least recently used files are evicted.
    lora_cache_dir: str = str(Path(tempfile.gettempdir()) / "lora-cache")
    lora_cache_bytes: int = 20 * 1024**3
    lora_max_bytes: int = 4 * 1024**3  # largest single LoRA download
    lora_fuse: bool = False  # fuse LoRAs into the denoiser's weights (originals kept in CPU memory)
    lora_roots: tuple[str, ...] = field(default=(), repr=False)  # folders a local LoRA path may point into
    # The step-distilled LoRA of the video preset "fast"; not logged, as its URL may carry a signed query.
    wan_fast_lora: str | None = field(default=None, repr=False)

    def loads_at_start(self, model: str) -> bool:
        """Whether model "sdxl" or "wan" loads at start-up: PRELOAD_MODELS names it, or its compile switch is on
        (a compiled model warms up before the first job)."""
        return model in self.preload or (self.wan_compile if model == "wan" else self.sdxl_compile)

    def summary(self) -> str:
        """The settings that differ from the defaults, as one short line for the start-up log (fields kept
        out of the repr are kept out of it too)."""
        default = Settings()
        changed = {f.name: getattr(self, f.name) for f in fields(self)
                   if f.repr and getattr(self, f.name) != getattr(default, f.name)}
        return ", ".join(f"{name}={value!r}" for name, value in changed.items()) or "all defaults"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}.") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {value}.")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"{name} must be a finite number of at least 0, got {raw!r}.")
    return value


# https://<bucket>.s3.<region>.amazonaws.com: the form RunPod's docs show for BUCKET_ENDPOINT_URL.
_AWS_VIRTUAL_HOST = re.compile(r"^(?P<bucket>[a-z0-9][a-z0-9.-]*)\.s3[.-](?P<region>[a-z0-9-]+)\.amazonaws\.com$")
# Region inside common endpoints: s3.<region>.amazonaws.com, s3.<region>.backblazeb2.com,
# <region>.digitaloceanspaces.com.
_ENDPOINT_REGION = (re.compile(r"(?:^|\.)s3[.-](?P<region>[a-z0-9-]+)\.(?:amazonaws|backblazeb2)\.com$"),
                    re.compile(r"^(?P<region>[a-z0-9-]+)\.digitaloceanspaces\.com$"))


def _bucket(env: Mapping[str, str]) -> Bucket | None:
    present = [name for name in BUCKET_VARS if env.get(name, "").strip()]
    if not present:
        return None
    if len(present) < len(BUCKET_VARS):
        missing = [name for name in BUCKET_VARS if name not in present]
        # runpod would silently write results to a local folder here; refuse instead.
        raise SettingsError(f"S3 output is half configured: {', '.join(present)} set but {', '.join(missing)} "
                            f"missing; set all three or none.")
    endpoint = env["BUCKET_ENDPOINT_URL"].strip().rstrip("/")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SettingsError(f"BUCKET_ENDPOINT_URL must be an http(s) URL, got {endpoint!r}.")
    name = env.get("BUCKET_NAME", "").strip()
    host = parsed.hostname
    named_in_url = parsed.path.strip("/").split("/")[0]
    virtual = _AWS_VIRTUAL_HOST.match(host)
    if virtual:
        # Virtual-hosted AWS endpoint: the bucket is the first label; talk to the regional endpoint.
        named_in_url = virtual["bucket"]
        host = f"s3.{virtual['region']}.amazonaws.com"
    if named_in_url:
        if name and name != named_in_url:
            raise SettingsError(f"BUCKET_ENDPOINT_URL names bucket {named_in_url!r} but BUCKET_NAME is {name!r}; "
                                f"set one of them, or both to the same bucket.")
        # Path-style (https://s3.example.com/my-bucket) or virtual-hosted: keep only scheme and host.
        name = named_in_url
        endpoint = f"{parsed.scheme}://{host}" + (f":{parsed.port}" if parsed.port else "")
    if not name:
        raise SettingsError("BUCKET_NAME is not set and BUCKET_ENDPOINT_URL names no bucket; set BUCKET_NAME.")
    region = env.get("BUCKET_REGION", "").strip()
    if not region:
        found = (pattern.search(host) for pattern in _ENDPOINT_REGION)
        region = next((m["region"] for m in found if m), "us-east-1")
    expiry = _int(env, "BUCKET_URL_EXPIRY_S", 7 * 24 * 3600)
    if expiry > 7 * 24 * 3600:
        raise SettingsError(f"BUCKET_URL_EXPIRY_S must be at most 604800 (7 days, the S3 limit), got {expiry}.")
    return Bucket(endpoint_url=endpoint, access_key_id=env["BUCKET_ACCESS_KEY_ID"].strip(),
                  secret_access_key=env["BUCKET_SECRET_ACCESS_KEY"].strip(), name=name, url_expiry_s=expiry,
                  region=region)


def _model_location(env: Mapping[str, str], var: str, folder: str, hub_id: str) -> str:
    """The env var if set, else MODEL_DIR/<folder> when it exists (baked weights), else the hub id."""
    if env.get(var):
        return env[var]
    baked = Path(env.get("MODEL_DIR") or "/models") / folder
    return str(baked) if (baked / "model_index.json").exists() or (baked / "config.json").exists() else hub_id


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be 1 or 0, got {raw!r}.")


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if not value > 0:
        raise SettingsError(f"{name} must be a number above 0, got {env.get(name)!r}.")
    return value


def _gib(env: Mapping[str, str], name: str, default: int) -> int:
    """A size given in GB (decimals allowed), as bytes."""
    value = _float(env, name, default / 1024**3)
    if not value > 0:
        raise SettingsError(f"{name} must be a positive number of GB, got {env.get(name)!r}.")
    return int(value * 1024**3)


def _lora_settings(env: Mapping[str, str]) -> dict:
    """Where LoRA files may come from and where downloads are cached (WAN_FAST_LORA's form is checked by
    plan.decide, with the request's own LoRA rules)."""
    volume = Path("/runpod-volume")
    default_cache = str(volume / "lora-cache") if volume.is_dir() else Settings.lora_cache_dir
    cache_dir = env.get("LORA_CACHE_DIR") or default_cache
    hf_home = env.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    roots = tuple(dict.fromkeys([env.get("MODEL_DIR") or "/models", str(volume), hf_home, cache_dir]))
    fast = env.get("WAN_FAST_LORA", "").strip() or None
    return dict(lora_cache_dir=cache_dir, lora_cache_bytes=_gib(env, "LORA_CACHE_GB", Settings.lora_cache_bytes),
                lora_max_bytes=_gib(env, "LORA_MAX_GB", Settings.lora_max_bytes),
                lora_fuse=_flag(env, "LORA_FUSE"), lora_roots=roots, wan_fast_lora=fast)


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = env.get(name, "").strip().upper() or default
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {env.get(name)!r}.")
    return value


def _compile_cache_dir(env: Mapping[str, str]) -> str | None:
    """COMPILE_CACHE_DIR, else a folder on the network volume when one is mounted ("off" disables it)."""
    raw = env.get("COMPILE_CACHE_DIR", "").strip()
    if raw.lower() in ("off", "0", "none"):
        return None
    if raw:
        return raw
    volume = Path("/runpod-volume")
    return str(volume / "torch-compile-cache") if volume.is_dir() else None


def load_settings(env: Mapping[str, str]) -> Settings:
    """Read the worker's configuration from an environment mapping."""
    preload = tuple(p.strip() for p in env.get("PRELOAD_MODELS", "").split(",") if p.strip())
    for name in preload:
        if name not in ("sdxl", "wan"):
            raise SettingsError(f"PRELOAD_MODELS may list 'sdxl' and 'wan', got {name!r}.")
    profile = env.get("MEMORY_PROFILE", "").strip() or "auto"
    if profile not in ("auto", "full", "offload", "lowvram"):
        raise SettingsError(f"MEMORY_PROFILE must be auto, full, offload or lowvram, got {profile!r}.")
    vae_dtype = env.get("WAN_VAE_DTYPE", "").strip() or Settings.wan_vae_dtype
    if vae_dtype not in ("float32", "bfloat16"):
        raise SettingsError(f"WAN_VAE_DTYPE must be float32 or bfloat16, got {vae_dtype!r}.")
    mp4_preset = env.get("MP4_PRESET", "").strip() or Settings.mp4_preset
    if mp4_preset not in X264_PRESETS:
        raise SettingsError(f"MP4_PRESET must be one of {', '.join(X264_PRESETS)}, got {mp4_preset!r}.")
    # RUNPOD_DEBUG_LEVEL is runpod's own name for its level: honoured unless RUNPOD_LOG_LEVEL is set.
    log_level_var = "RUNPOD_LOG_LEVEL" if env.get("RUNPOD_LOG_LEVEL", "").strip() else "RUNPOD_DEBUG_LEVEL"
    return Settings(
        sdxl_model_id=_model_location(env, "SDXL_MODEL_ID", "sdxl-base", DEFAULT_SDXL_MODEL_ID),
        sdxl_refiner_id=_model_location(env, "SDXL_REFINER_ID", "sdxl-refiner", DEFAULT_SDXL_REFINER_ID),
        sdxl_vae_id=_model_location(env, "SDXL_VAE_ID", "sdxl-vae", DEFAULT_SDXL_VAE_ID),
        wan_model_id=_model_location(env, "WAN_MODEL_ID", "wan-i2v", DEFAULT_WAN_MODEL_ID),
        model_dir=env.get("MODEL_DIR") or Settings.model_dir,
        weights_download=_flag(env, "WEIGHTS_DOWNLOAD", True),
        preload=preload,
        bucket=_bucket(env),
        max_video_tokens=_int(env, "MAX_VIDEO_TOKENS", Settings.max_video_tokens),
        max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", Settings.max_image_pixels),
        max_inline_chars=int(_positive(env, "MAX_INLINE_MB", Settings.max_inline_chars / 1e6) * 1e6),
        max_input_image_bytes=_int(env, "MAX_INPUT_IMAGE_BYTES", Settings.max_input_image_bytes),
        max_input_image_pixels=_int(env, "MAX_INPUT_IMAGE_PIXELS", Settings.max_input_image_pixels),
        fetch_timeout_s=_positive(env, "FETCH_TIMEOUT_S", Settings.fetch_timeout_s),
        memory_profile=profile,
        wan_fp8=_flag(env, "WAN_FP8"),
        wan_fp8_attention=_flag(env, "WAN_FP8_ATTENTION"),
        wan_compile=_flag(env, "WAN_COMPILE"),
        wan_vae_dtype=vae_dtype,
        sdxl_compile=_flag(env, "SDXL_COMPILE"),
        compile_cache_dir=_compile_cache_dir(env),
        num_gpus=_int(env, "NUM_GPUS", 1),
        runpod_log_level=_choice(env, log_level_var, RUNPOD_LOG_LEVELS, "INFO"),
        on_runpod=bool(env.get("RUNPOD_WEBHOOK_GET_JOB")),
        local_output_dir=env.get("LOCAL_OUTPUT_DIR") or "outputs",
        mp4_preset=mp4_preset,
        **_lora_settings(env),
    )
