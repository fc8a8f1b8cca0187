#!/usr/bin/env python3
"""Benchmark the worker on the full-size Wan2.1-I2V-14B-480P and SDXL architectures with random weights.

A forward pass costs the same whatever the weights hold, so full-size models with random
weights, saved with save_pretrained in the worker's folder layout and loaded by the worker's
own ModelHandler exactly as real weights are, give honest load times, per-step times, phase
times and peak GPU memory (DESIGN.md section 5). Every job also runs through the plain
diffusers model-card recipe in the same run, so each figure gets a worker/plain ratio.

    python benchmarks/bench.py --quick                     # one H100, one command under 10 minutes
    python benchmarks/bench.py --full --only video81 --impl worker
    python benchmarks/bench.py --tiny --out /tmp/bench     # CPU, tiny models, the same code path (tests)
    python benchmarks/bench.py --merge a/bench.json b/bench.json --out merged

Results go to OUT/bench.json and OUT/bench.md (OUT: --out, else $OUT, else ./bench-out),
rewritten after every measurement so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import dataclasses
import datetime
import functools
import gc
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the worker's modules: handler, model_handler, settings, download_weights

GIB = 1024**3
STAGES = ("build", "disk", "image", "video81", "video33", "cold", "profiles")
SEED = 42
VIDEO_PROMPT = "A red fox trots across a snowy meadow at sunrise, soft light, the camera slowly follows it"
IMAGE_PROMPT = "A lighthouse on a rocky coast at dusk, dramatic clouds, highly detailed photograph"
VIDEO_TARGET_STEPS = 40  # the worker's default (official I2V setting)
IMAGE_TARGET_STEPS = (25, 50)  # the worker's defaults: base num_inference_steps, refiner_inference_steps
HIGH_NOISE_FRAC = 0.8
BUILD_VERSION = 2  # 2: Wan transformer and UMT5 in 5 GB shards
# Emulated cards: the total memory such a card reports (GiB). 24 GB: RTX 4090 / A5000 (23.6-24.0),
# 48 GB: L40S / A40 (44.4) and RTX A6000 (47.5) -> the smaller; 80 GB: A100 / H100 80GB (79.2-79.6).
CARDS = {"24": 23.6, "48": 44.4, "80": 79.2}
CONTEXT_GIB = 0.5  # CUDA context memory a real card loses outside the caching allocator
# Settings fields the worker may offer to override the GPU memory it plans placement with.
MEMORY_OVERRIDE_FIELDS = ("gpu_memory_gib", "gpu_total_gib", "gpu_memory_limit_gib")


# --------------------------------------------------------------------------------------------
# Model configurations: the real architectures ("full") and small ones of the same structure
# ("mini", CPU tests). Wan transformer and SDXL base UNet as in shared/gpu/baseline_random_weights.py.
# --------------------------------------------------------------------------------------------
CONFIGS: dict[str, dict[str, dict]] = {
    "full": {
        "wan_transformer": dict(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024),
        "umt5": dict(
            d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=256384,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
            dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1),
        "clip_vision": dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=1024, hidden_act="gelu"),
        "wan_vae": {},  # AutoencoderKLWan() defaults are the real config
        "image_processor": dict(crop_size=224, size=224),
        "sdxl_unet": dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816),
        # stabilityai/stable-diffusion-xl-refiner-1.0: 4 levels, cross-attention in the middle two, depth 4.
        "refiner_unet": dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(384, 768, 1536, 1536),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280, transformer_layers_per_block=4,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2560),
        # Token ids follow the tiny character tokenizer (bos 0, eos 1); speed does not depend on them.
        "clip_l": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
            hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1),
        "clip_g": dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
            eos_token_id=1, pad_token_id=1),
        "sdxl_vae": dict(
            block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025),
    },
    "mini": {
        "wan_transformer": dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=32, added_kv_proj_dim=24, rope_max_seq_len=1024),
        "umt5": dict(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=256, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=16, dense_act_fn="gelu_new",
            is_gated_act=True, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1),
        "clip_vision": dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=2,
            image_size=32, projection_dim=32, hidden_act="gelu"),
        "wan_vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                        temperal_downsample=[False, True, True]),
        "image_processor": dict(crop_size=32, size=32),
        "sdxl_unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), cross_attention_dim=64,
            transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80),
        "refiner_unet": dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32, transformer_layers_per_block=1,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=72),
        "clip_l": dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
            hidden_act="quick_gelu", vocab_size=200, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1),
        "clip_g": dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
            hidden_act="gelu", vocab_size=200, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1),
        "sdxl_vae": dict(
            block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.13025),
    },
}
GROUP_FOLDERS = {"sdxl": ("sdxl-base", "sdxl-refiner", "sdxl-vae"), "wan": ("wan-i2v",)}
# Bytes written per group at full size (model-card dtypes), for the disk-space check.
GROUP_BYTES_FULL = {"wan": 47.3e9, "sdxl": 11.7e9}


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    name: str
    frames: int
    height: int
    width: int
    steps: int
    derive: bool  # send no height/width: the worker derives 480x832 from the 832x480 input image


@dataclasses.dataclass(frozen=True)
class Plan:
    mode: str  # tiny | quick | full
    videos: dict[str, VideoSpec]
    image_size: tuple[int, int]  # height, width
    image_steps: tuple[int, int]  # base num_inference_steps, refiner_inference_steps
    input_size: tuple[int, int]  # width, height of the input image for video jobs
    cold: VideoSpec
    profile: VideoSpec
    cards: tuple[str, ...]
    budget_s: float | None
    evict_loads: bool
    disk_read_gib: float


def make_plan(args: argparse.Namespace) -> Plan:
    mode = "tiny" if args.tiny else ("full" if args.full else "quick")
    if mode == "tiny":
        steps = args.video_steps or 2
        videos = {"video81": VideoSpec("video81", 9, 64, 64, steps, False),
                  "video33": VideoSpec("video33", 5, 64, 64, steps, False)}
        cold = VideoSpec("cold", 5, 64, 64, args.cold_steps or 2, False)
        image_size, input_size, image_steps = (128, 128), (64, 48), (2, 2)
    else:
        steps = args.video_steps or (2 if mode == "quick" else VIDEO_TARGET_STEPS)
        videos = {"video81": VideoSpec("video81", 81, 480, 832, steps, True),
                  "video33": VideoSpec("video33", 33, 480, 832, steps, True)}
        cold_frames = 33 if mode == "quick" else 81
        cold = VideoSpec("cold", cold_frames, 480, 832, args.cold_steps or 2, True)
        image_size, input_size = (1024, 1024), (832, 480)
        image_steps = (10, 10) if mode == "quick" else IMAGE_TARGET_STEPS
    if args.image_steps:
        base, refiner = (int(x) for x in args.image_steps.split(","))
        image_steps = (base, refiner)
    profile_steps = args.profile_steps or (2 if mode != "full" else 3)
    profile = dataclasses.replace(videos["video81"], name="profile", steps=profile_steps)
    cards = tuple(c for c in (args.cards or ("48" if mode != "full" else "24,48,80")).split(",") if c)
    budget = args.budget_s if args.budget_s is not None else (540.0 if mode == "quick" else None)
    evict = args.evict_loads if args.evict_loads is not None else (mode == "full")
    return Plan(mode, videos, image_size, image_steps, input_size, cold, profile, cards, budget or None, evict,
                args.disk_read_gib if args.disk_read_gib else (8.0 if mode != "tiny" else 1.0))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def script_record(tag: str) -> tuple[dict, Callable[[str], None]]:
    """The results dict and timestamped logger shared by the probe scripts (levers, fast_preset, step_cache)."""
    import torch

    start = time.perf_counter()
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}

    def log(msg: str) -> None:
        print(f"[{tag} {time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    return record, log


def _err(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def _deep_merge(into: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key] = into[key] + [v for v in value if v not in into[key]]
        else:
            into[key] = value
    return into


def safetensors_bytes(folders: list[Path], pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for folder in folders if folder.exists() for p in folder.rglob(pattern))


def input_image(width: int, height: int):
    """A smooth, deterministic test picture (small as PNG, so it fits a command line as base64)."""
    import numpy as np
    from PIL import Image, ImageDraw

    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    rgb = np.stack([0.2 + 0.6 * x + 0 * y, 0.3 + 0.5 * y + 0 * x, 0.8 - 0.5 * x * y], axis=-1)
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width * 0.3, height * 0.3, width * 0.55, height * 0.75), fill=(200, 90, 40))
    draw.rectangle((width * 0.65, height * 0.2, width * 0.85, height * 0.6), fill=(40, 120, 60))
    return image


def png_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@functools.lru_cache(maxsize=2)
def synthetic_frames(frames: int, height: int, width: int):
    """A clip with motion and grain (uint8), to time MP4 encoding on content like a real video's."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    x = np.arange(width, dtype=np.float32)[None, :]
    y = np.arange(height, dtype=np.float32)[:, None]
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        r = 128 + 100 * np.sin((x + 6 * i) / 37.0) * np.cos((y - 3 * i) / 29.0)
        g = 128 + 90 * np.sin((x - 4 * i) / 53.0 + y / 41.0)
        b = 128 + 80 * np.cos((x + y + 5 * i) / 61.0)
        frame = np.stack([r, g, b], axis=-1) + rng.normal(0, 6, (height, width, 1))
        out[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------
# Page cache and disk
# --------------------------------------------------------------------------------------------
def evict_page_cache(paths: list[Path], drop_caches: bool = False) -> str:
    """Drop these files from the page cache so the next read comes from the disk; returns the method used.

    posix_fadvise(DONTNEED) needs no privileges and drops the clean pages of each file (after a sync);
    drop_caches (root only, drops the whole machine's page cache) is the fallback when that did not work.
    """
    start = time.perf_counter()
    os.sync()  # dirty pages cannot be dropped
    sync_s = time.perf_counter() - start
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        finally:
            os.close(fd)
    methods = [f"sync ({sync_s:.1f}s) + posix_fadvise(DONTNEED) on {done} files"]
    if drop_caches:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            methods.append("echo 1 > /proc/sys/vm/drop_caches")
        except OSError as err:
            methods.append(f"drop_caches unavailable ({err.strerror})")
    return "; ".join(methods)


def read_speed(path: Path, limit_bytes: int) -> tuple[int, float]:
    """Read up to limit_bytes of path sequentially in 16 MiB blocks; returns (bytes, seconds)."""
    buf = bytearray(16 * 1024 * 1024)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while total < limit_bytes:
            n = fh.readinto(view)
            if not n:
                break
            total += n
    return total, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Building the models (random weights, real configs) in the worker's folder layout
# --------------------------------------------------------------------------------------------
def _make(kind: str, cfg: dict):
    from diffusers import AutoencoderKL, AutoencoderKLWan, UNet2DConditionModel, WanTransformer3DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    factories: dict[str, Callable[[], Any]] = {
        "wan_transformer": lambda: WanTransformer3DModel(**cfg),
        "umt5": lambda: UMT5EncoderModel(UMT5Config(**cfg)),
        "clip_vision": lambda: CLIPVisionModel(CLIPVisionConfig(**cfg)),
        "wan_vae": lambda: AutoencoderKLWan(**cfg),
        "sdxl_unet": lambda: UNet2DConditionModel(**cfg),
        "refiner_unet": lambda: UNet2DConditionModel(**cfg),
        "clip_l": lambda: CLIPTextModel(CLIPTextConfig(**cfg)),
        "clip_g": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)),
        "sdxl_vae": lambda: AutoencoderKL(**cfg),
    }
    return factories[kind]()


def build_component(kind: str, cfg: dict, dtype, device: str, seed: int):
    """Instantiate directly on `device` in `dtype`, then N(0, 0.02) on every weight matrix."""
    import torch

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = _make(kind, cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def _save(model, folder: Path, variant: str | None, shard: str | None = None) -> tuple[int, float]:
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    model.save_pretrained(str(folder), variant=variant, **({"max_shard_size": shard} if shard else {}))
    return sum(p.numel() for p in model.parameters()), time.perf_counter() - start


def build_group(group: str, workdir: Path, size: str, device: str, log: Callable[[str], None]) -> dict:
    """Build one model group into workdir: the tiny layout from download_weights, heavy parts replaced."""
    import torch

    import download_weights

    cfgs = CONFIGS[size]
    remove_group(workdir, group)
    start = time.perf_counter()
    record: dict[str, Any] = {"size": size, "device": device, "components": {}}
    half, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
    if group == "wan":
        # Tokenizer (T5, padded to 512), scheduler (UniPC flow, shift 3.0) and model_index.json come from the
        # tiny builder, written by the diffusers/transformers versions that will load them.
        download_weights.build_tiny_wan(workdir)
        root = workdir / "wan-i2v"
        parts = [("transformer", "wan_transformer", bf16), ("text_encoder", "umt5", bf16),
                 ("image_encoder", "clip_vision", fp32), ("vae", "wan_vae", fp32)]
        for i, (sub, kind, dtype) in enumerate(parts):
            t0 = time.perf_counter()
            model = build_component(kind, cfgs[kind], dtype, device, seed=100 + i)
            init_s = time.perf_counter() - t0
            # Shards of at most 5 GB, as download_weights.compact_wan writes the hub's transformer (14 float32
            # shards there) and UMT5 (5): what the worker reads at a cold start after `download_weights --dir`.
            params, save_s = _save(model, root / sub, None, "5GB" if sub in ("transformer", "text_encoder") else None)
            del model
            release_gpu()
            record["components"][sub] = {"params_B": params / 1e9, "dtype": str(dtype).replace("torch.", ""),
                                         "init_s": init_s, "save_s": save_s}
            log(f"  built wan-i2v/{sub}: {params / 1e9:.2f} B params, init {init_s:.1f}s, save {save_s:.1f}s")
        from transformers import CLIPImageProcessor

        shutil.rmtree(root / "image_processor")
        CLIPImageProcessor(**cfgs["image_processor"]).save_pretrained(str(root / "image_processor"))
    else:
        download_weights.build_tiny_sdxl(workdir)
        base, refiner = workdir / "sdxl-base", workdir / "sdxl-refiner"
        parts = [
            (base / "unet", "sdxl_unet", half, "fp16", {}),
            (base / "text_encoder", "clip_l", half, "fp16", {}),
            (base / "text_encoder_2", "clip_g", half, "fp16", {}),
            # The base checkpoint's own VAE (used by the model-card recipe) upcasts to fp32 to decode.
            (base / "vae", "sdxl_vae", half, "fp16", {"force_upcast": True}),
            (refiner / "unet", "refiner_unet", half, "fp16", {}),
            # madebyollin/sdxl-vae-fp16-fix (the worker's VAE): fp32 file, decodes in fp16.
            (workdir / "sdxl-vae", "sdxl_vae", fp32, None, {"force_upcast": False}),
        ]
        for i, (folder, kind, dtype, variant, extra) in enumerate(parts):
            t0 = time.perf_counter()
            model = build_component(kind, {**cfgs[kind], **extra}, dtype, device, seed=200 + i)
            init_s = time.perf_counter() - t0
            params, save_s = _save(model, folder, variant)
            del model
            release_gpu()
            label = str(folder.relative_to(workdir))
            record["components"][label] = {"params_B": params / 1e9, "dtype": str(dtype).replace("torch.", ""),
                                           "init_s": init_s, "save_s": save_s}
            log(f"  built {label}: {params / 1e9:.2f} B params, init {init_s:.1f}s, save {save_s:.1f}s")
        # The worker and the model-card recipe both hand the base's text_encoder_2 and a VAE to the refiner,
        # so the refiner's own copies are never read; removing the tiny ones makes any such read fail loudly.
        for sub in ("text_encoder_2", "vae"):
            shutil.rmtree(refiner / sub, ignore_errors=True)
    record["total_s"] = time.perf_counter() - start  # write-back to disk goes on; the first eviction syncs
    record["bytes"] = safetensors_bytes([workdir / f for f in GROUP_FOLDERS[group]])
    (workdir / f".bench-{group}.json").write_text(json.dumps({"size": size, "version": BUILD_VERSION}))
    return record


def remove_group(workdir: Path, group: str) -> None:
    (workdir / f".bench-{group}.json").unlink(missing_ok=True)  # first: a half-removed group is never "ready"
    for name in GROUP_FOLDERS[group]:
        if (workdir / name).exists():
            shutil.rmtree(workdir / name)


def group_ready(workdir: Path, group: str, size: str) -> bool:
    marker = workdir / f".bench-{group}.json"
    if not marker.exists():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("size") == size and info.get("version") == BUILD_VERSION and all(
        (workdir / f).exists() for f in GROUP_FOLDERS[group])


# --------------------------------------------------------------------------------------------
# Phase accounting: forward hooks on the pipelines' models, peaks reset at each phase boundary
# --------------------------------------------------------------------------------------------
class PhaseTracker:
    """Splits a job into phases (entered from model hooks) with time and peak GPU memory per phase.

    Each boundary synchronizes the GPU, so a phase's time is the GPU work done inside it. Timed
    modules (the denoisers) also record each forward call's start and end, which give per-step times.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._handles: list[Any] = []
        self._wrapped: list[tuple[Any, str]] = []
        self.reset()

    def reset(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.calls: dict[str, list[tuple[float, float]]] = {}
        self.current: str | None = None
        self.t0 = 0.0
        self._open: dict[str, float] = {}

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, name: str) -> None:
        if name == self.current:
            return
        t = self.now()
        self._close(t)
        self.current, self.t0 = name, t
        self.phases.setdefault(name, {"s": 0.0, "entries": 0, "peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0})

    def finish(self) -> None:
        self._close(self.now())
        self.current = None

    def _close(self, t: float) -> None:
        if self.current is None:
            return
        rec = self.phases[self.current]
        rec["s"] += t - self.t0
        rec["entries"] += 1
        if self.cuda:
            import torch

            rec["peak_allocated_gib"] = max(rec["peak_allocated_gib"], torch.cuda.max_memory_allocated() / GIB)
            rec["peak_reserved_gib"] = max(rec["peak_reserved_gib"], torch.cuda.max_memory_reserved() / GIB)
            torch.cuda.reset_peak_memory_stats()

    def on_forward(self, module: Any, phase: str, timed: str | None = None) -> None:
        def pre(mod: Any, args: Any) -> None:
            self.enter(phase)
            if timed:
                self._open[timed] = self.now()

        def post(mod: Any, args: Any, output: Any) -> None:
            if timed and timed in self._open:
                self.calls.setdefault(timed, []).append((self._open.pop(timed), self.now()))

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def wrap(self, obj: Any, method: str, phase: str, after: str | None = None) -> None:
        """Enter `phase` when obj.method is called (e.g. vae.decode, not a forward), `after` when it returns."""
        original = getattr(obj, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase)
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    self.enter(after)

        setattr(obj, method, wrapper)
        self._wrapped.append((obj, method))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for obj, method in self._wrapped:
            with contextlib.suppress(AttributeError):
                delattr(obj, method)  # the instance attribute; the class method shows through again
        self._handles, self._wrapped = [], []


@contextlib.contextmanager
def patched_phase(module: Any, name: str, tracker: PhaseTracker, phase: str, after: str) -> Iterator[None]:
    """Temporarily wrap module.name (a function the handler calls, e.g. frames_to_mp4) as a phase."""
    original = getattr(module, name, None)
    if original is None:  # the handler no longer calls it by that name: its time stays in "postprocess"
        yield
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tracker.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            tracker.enter(after)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def hook_wan(tracker: PhaseTracker, pipe: Any) -> None:
    tracker.on_forward(pipe.text_encoder, "text_encode")
    tracker.on_forward(pipe.image_encoder, "image_encode")
    tracker.on_forward(pipe.transformer, "denoise", timed="transformer")
    tracker.wrap(pipe.vae, "encode", "vae_encode", after="other")
    tracker.wrap(pipe.vae, "decode", "vae_decode", after="postprocess")


def hook_sdxl(tracker: PhaseTracker, base: Any, refiner: Any) -> None:
    tracker.on_forward(base.text_encoder, "text_encode")
    tracker.on_forward(base.text_encoder_2, "text_encode")
    if refiner.text_encoder_2 is not base.text_encoder_2:
        tracker.on_forward(refiner.text_encoder_2, "text_encode")
    tracker.on_forward(base.unet, "denoise_base", timed="base_unet")
    tracker.on_forward(refiner.unet, "denoise_refiner", timed="refiner_unet")
    for vae in {id(base.vae): base.vae, id(refiner.vae): refiner.vae}.values():
        tracker.wrap(vae, "decode", "vae_decode", after="postprocess")


def step_times(calls: list[tuple[float, float]], steps: int) -> list[float]:
    """Per-step seconds from the denoiser's calls (2 a step with Wan's separate CFG pass, 1 for SDXL)."""
    if not calls or steps <= 0:
        return []
    per = max(1, round(len(calls) / steps))
    starts = [calls[i][0] for i in range(0, len(calls), per)]
    out = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    out.append(calls[-1][1] - starts[-1])
    return out


def steady(values: list[float]) -> float | None:
    """Per-step time without the first step's warm-up."""
    if not values:
        return None
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def _phase_s(tracker: PhaseTracker, *names: str) -> float:
    return sum(tracker.phases.get(n, {}).get("s", 0.0) for n in names)


def _peaks(tracker: PhaseTracker, skip: tuple[str, ...] = ("load",)) -> tuple[float, float]:
    phases = [p for n, p in tracker.phases.items() if n not in skip]
    return (max((p["peak_allocated_gib"] for p in phases), default=0.0),
            max((p["peak_reserved_gib"] for p in phases), default=0.0))


def video_record(impl: str, spec: VideoSpec, wall_s: float, tracker: PhaseTracker, height: int, width: int) -> dict:
    calls = tracker.calls.get("transformer", [])
    steps = step_times(calls, spec.steps)
    per_step = steady(steps)
    denoise_s = _phase_s(tracker, "denoise")
    peak_alloc, peak_res = _peaks(tracker)
    rec: dict[str, Any] = {
        "impl": impl, "job": spec.name, "frames": spec.frames, "height": height, "width": width,
        "steps": spec.steps, "wall_s": wall_s, "step_s": steps, "step_s_steady": per_step,
        "forward_s": [b - a for a, b in calls], "transformer_calls": len(calls),
        "encode_s": _phase_s(tracker, "text_encode", "image_encode"), "vae_encode_s": _phase_s(tracker, "vae_encode"),
        "denoise_s": denoise_s, "vae_decode_s": _phase_s(tracker, "vae_decode"),
        "mp4_encode_s": _phase_s(tracker, "mp4_encode"), "peak_allocated_gib": peak_alloc,
        "peak_reserved_gib": peak_res, "phases": dict(tracker.phases),
    }
    if per_step is not None:
        rec["e2e_40_steps_s"] = wall_s - denoise_s + VIDEO_TARGET_STEPS * per_step
        rec["e2e_40_steps_extrapolated"] = spec.steps != VIDEO_TARGET_STEPS
    return rec


def image_record(impl: str, name: str, steps: tuple[int, int], size: tuple[int, int], wall_s: float,
                 tracker: PhaseTracker) -> dict:
    base_steps = int(steps[0] * HIGH_NOISE_FRAC)
    refiner_steps = steps[1] - int(steps[1] * HIGH_NOISE_FRAC)
    base = step_times(tracker.calls.get("base_unet", []), base_steps)
    refiner = step_times(tracker.calls.get("refiner_unet", []), refiner_steps)
    peak_alloc, peak_res = _peaks(tracker)
    rec: dict[str, Any] = {
        "impl": impl, "job": name, "height": size[0], "width": size[1], "num_inference_steps": steps[0],
        "refiner_inference_steps": steps[1], "base_steps_run": base_steps, "refiner_steps_run": refiner_steps,
        "wall_s": wall_s, "base_step_s": base, "refiner_step_s": refiner, "base_step_s_steady": steady(base),
        "refiner_step_s_steady": steady(refiner), "encode_s": _phase_s(tracker, "text_encode"),
        "denoise_base_s": _phase_s(tracker, "denoise_base"), "denoise_refiner_s": _phase_s(tracker, "denoise_refiner"),
        "vae_decode_s": _phase_s(tracker, "vae_decode"), "png_encode_s": _phase_s(tracker, "png_encode"),
        "peak_allocated_gib": peak_alloc, "peak_reserved_gib": peak_res, "phases": dict(tracker.phases),
    }
    tb = int(IMAGE_TARGET_STEPS[0] * HIGH_NOISE_FRAC)
    tr = IMAGE_TARGET_STEPS[1] - int(IMAGE_TARGET_STEPS[1] * HIGH_NOISE_FRAC)
    if rec["base_step_s_steady"] is not None and rec["refiner_step_s_steady"] is not None:
        rec["e2e_default_steps_s"] = (wall_s - rec["denoise_base_s"] - rec["denoise_refiner_s"]
                                      + tb * rec["base_step_s_steady"] + tr * rec["refiner_step_s_steady"])
        rec["e2e_default_steps_extrapolated"] = tuple(steps) != IMAGE_TARGET_STEPS
    return rec


# --------------------------------------------------------------------------------------------
# The worker's path and the plain diffusers model-card recipe
# --------------------------------------------------------------------------------------------
def memory_override_field() -> str | None:
    from settings import Settings

    names = {f.name for f in dataclasses.fields(Settings)}
    return next((f for f in MEMORY_OVERRIDE_FIELDS if f in names), None)


def worker_env(workdir: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the worker runs with: the bench's models, nothing of RunPod or a bucket, plus --set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BUCKET_", "RUNPOD_")) and k not in ("PRELOAD_MODELS", "GPU_MEMORY_GIB")}
    env.update(SDXL_MODEL_ID=str(workdir / "sdxl-base"), SDXL_REFINER_ID=str(workdir / "sdxl-refiner"),
               SDXL_VAE_ID=str(workdir / "sdxl-vae"), WAN_MODEL_ID=str(workdir / "wan-i2v"),
               PYTHONUNBUFFERED="1")
    env.update(overrides or {})
    return env


def worker_settings(env: dict[str, str]):
    """Settings exactly as the worker reads them from its environment (settings.load_settings)."""
    from settings import load_settings

    return load_settings(env)


def video_input(spec: VideoSpec, image_uri: str) -> dict:
    job = {"mode": "video", "image_url": image_uri, "prompt": VIDEO_PROMPT, "num_frames": spec.frames,
           "num_inference_steps": spec.steps, "seed": SEED, "output": "base64"}
    if not spec.derive:
        job.update(height=spec.height, width=spec.width)
    return job


def worker_video(tracker: PhaseTracker, spec: VideoSpec, image_uri: str) -> dict:
    import handler

    tracker.reset()
    with patched_phase(handler, "frames_to_mp4", tracker, "mp4_encode", "deliver"):
        start = time.perf_counter()
        tracker.enter("prepare")
        result = handler.handler({"id": f"bench-{spec.name}", "input": video_input(spec, image_uri)})
        tracker.finish()
        wall = time.perf_counter() - start
    if "error" in result:
        return {"impl": "worker", "job": spec.name, "error": result["error"], "wall_s": wall,
                "phases": dict(tracker.phases)}
    rec = video_record("worker", spec, wall, tracker, result["height"], result["width"])
    rec["timings"] = result.get("timings", {})
    rec["output_bytes"] = len(result["video"].split(",", 1)[-1]) * 3 // 4
    return rec


def worker_image(tracker: PhaseTracker, steps: tuple[int, int], size: tuple[int, int]) -> dict:
    import handler

    job = {"mode": "image", "prompt": IMAGE_PROMPT, "height": size[0], "width": size[1],
           "num_inference_steps": steps[0], "refiner_inference_steps": steps[1], "high_noise_frac": HIGH_NOISE_FRAC,
           "seed": SEED, "output": "base64"}
    tracker.reset()
    with patched_phase(handler, "png_bytes", tracker, "png_encode", "deliver"):
        start = time.perf_counter()
        tracker.enter("prepare")
        result = handler.handler({"id": "bench-image", "input": job})
        tracker.finish()
        wall = time.perf_counter() - start
    if "error" in result:
        return {"impl": "worker", "job": "image", "error": result["error"], "wall_s": wall}
    rec = image_record("worker", "image", steps, size, wall, tracker)
    rec["timings"] = result.get("timings", {})
    return rec


def plain_load_wan(model_dir: Path, cuda: bool):
    """The Wan2.1-I2V-14B-480P-Diffusers model card: image encoder and VAE in fp32, the rest bf16, .to('cuda')."""
    import torch
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    rest = torch.bfloat16 if cuda else torch.float32
    image_encoder = CLIPVisionModel.from_pretrained(str(model_dir), subfolder="image_encoder", dtype=torch.float32)
    vae = AutoencoderKLWan.from_pretrained(str(model_dir), subfolder="vae", dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(str(model_dir), vae=vae, image_encoder=image_encoder, dtype=rest)
    pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_video(tracker: PhaseTracker, pipe: Any, spec: VideoSpec, image: Any, out_path: Path) -> dict:
    import numpy as np
    import torch
    from diffusers.utils import export_to_video

    from schemas import WAN_NEGATIVE_PROMPT

    tracker.reset()
    start = time.perf_counter()
    tracker.enter("prepare")
    if spec.derive:  # the model card's sizing: max area 480*832, multiples of vae scale x patch size
        max_area = spec.height * spec.width
        aspect = image.height / image.width
        mod = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
        height = round(np.sqrt(max_area * aspect)) // mod * mod
        width = round(np.sqrt(max_area / aspect)) // mod * mod
    else:
        height, width = spec.height, spec.width
    image = image.resize((width, height))
    frames = pipe(image=image, prompt=VIDEO_PROMPT, negative_prompt=WAN_NEGATIVE_PROMPT, height=height, width=width,
                  num_frames=spec.frames, guidance_scale=5.0, num_inference_steps=spec.steps,
                  generator=torch.Generator("cpu").manual_seed(SEED)).frames[0]
    tracker.enter("mp4_encode")
    export_to_video(frames, str(out_path), fps=16)
    tracker.finish()
    wall = time.perf_counter() - start
    rec = video_record("plain", spec, wall, tracker, height, width)
    rec["output_bytes"] = out_path.stat().st_size
    return rec


def plain_load_sdxl(base_dir: Path, refiner_dir: Path, cuda: bool):
    """The SDXL 1.0 model card: base + refiner as an ensemble of experts, fp16 variant, .to('cuda')."""
    import torch
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    base = DiffusionPipeline.from_pretrained(str(base_dir), dtype=dtype, variant="fp16", use_safetensors=True)
    base.to(device)
    refiner = DiffusionPipeline.from_pretrained(str(refiner_dir), text_encoder_2=base.text_encoder_2, vae=base.vae,
                                                dtype=dtype, use_safetensors=True, variant="fp16")
    refiner.to(device)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def plain_image(tracker: PhaseTracker, base: Any, refiner: Any, steps: tuple[int, int], size: tuple[int, int]) -> dict:
    import torch

    tracker.reset()
    start = time.perf_counter()
    tracker.enter("prepare")
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = base(prompt=IMAGE_PROMPT, height=size[0], width=size[1], num_inference_steps=steps[0],
                   denoising_end=HIGH_NOISE_FRAC, guidance_scale=7.5, output_type="latent",
                   generator=generator).images
    image = refiner(prompt=IMAGE_PROMPT, num_inference_steps=steps[1], denoising_start=HIGH_NOISE_FRAC,
                    guidance_scale=7.5, image=latents, generator=generator).images[0]
    tracker.enter("png_encode")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    tracker.finish()
    return image_record("plain", "image", steps, size, time.perf_counter() - start, tracker)


def measure_load(tracker: PhaseTracker, fn: Callable[[], Any], nbytes: int, page_cache: str) -> tuple[Any, dict]:
    tracker.reset()
    start = time.perf_counter()
    tracker.enter("load")
    value = fn()
    tracker.finish()
    wall = time.perf_counter() - start
    phase = tracker.phases["load"]
    rec = {"wall_s": wall, "bytes": nbytes, "gb_per_s": nbytes / wall / 1e9 if wall else None,
           "page_cache": page_cache, "peak_allocated_gib": phase["peak_allocated_gib"],
           "peak_reserved_gib": phase["peak_reserved_gib"]}
    if tracker.cuda:
        import torch

        rec["allocated_after_gib"] = torch.cuda.memory_allocated() / GIB
    return value, rec


def release_gpu() -> float:
    """Collect garbage and return cached blocks; returns GiB still allocated."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return 0.0
    with contextlib.suppress(Exception):  # compiled blocks (--set WAN_COMPILE=1) keep their modules alive
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / GIB
    return 0.0


def wan_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "wan-i2v").rglob("*.safetensors"))


def worker_sdxl_files(workdir: Path) -> list[Path]:
    base, refiner = workdir / "sdxl-base", workdir / "sdxl-refiner"
    files = [p for sub in ("unet", "text_encoder", "text_encoder_2") for p in (base / sub).glob("*.fp16.safetensors")]
    files += list((refiner / "unet").glob("*.fp16.safetensors"))
    files += list((workdir / "sdxl-vae").glob("*.safetensors"))
    return files


def plain_sdxl_files(workdir: Path) -> list[Path]:
    base, refiner = workdir / "sdxl-base", workdir / "sdxl-refiner"
    files = [p for sub in ("unet", "text_encoder", "text_encoder_2", "vae")
             for p in (base / sub).glob("*.fp16.safetensors")]
    return files + list((refiner / "unet").glob("*.fp16.safetensors"))


# --------------------------------------------------------------------------------------------
# Subprocesses: cold start (worker and plain) and memory profiles
# --------------------------------------------------------------------------------------------
def run_timed(cmd: list[str], env: dict[str, str], timeout_s: float, log_path: Path) -> dict:
    """Run cmd, timestamping each output line relative to the start; kills it at timeout_s."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    lines: list[tuple[float, str]] = []
    timed_out = threading.Event()

    def watchdog() -> None:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out.set()
            proc.kill()  # our own child, by its handle

    guard = threading.Thread(target=watchdog, daemon=True)
    guard.start()
    with open(log_path, "w") as log:
        for line in proc.stdout:  # type: ignore[union-attr]
            t = time.perf_counter() - start
            lines.append((t, line.rstrip("\n")))
            log.write(f"{t:9.3f} {line}")
    rc = proc.wait()
    return {"rc": rc, "exit_s": time.perf_counter() - start, "lines": lines, "timed_out": timed_out.is_set()}


def _first(lines: list[tuple[float, str]], needle: str) -> tuple[float, str] | None:
    return next(((t, line) for t, line in lines if needle in line), None)


def _tail(lines: list[tuple[float, str]], n: int = 15) -> list[str]:
    return [line[:300] for _, line in lines[-n:]]


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args, self.plan = args, plan
        self.start = time.perf_counter()
        self.out = Path(args.out or os.environ.get("OUT") or "bench-out")
        self.out.mkdir(parents=True, exist_ok=True)
        self._own_workdir = None
        if args.workdir:
            self.workdir = Path(args.workdir)
        elif plan.mode == "tiny":
            self._own_workdir = tempfile.mkdtemp(prefix="bench-tiny-")
            self.workdir = Path(self._own_workdir)
        else:
            self.workdir = Path("/tmp/bench-models")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scratch = self.workdir / "scratch"
        self.scratch.mkdir(exist_ok=True)
        if args.only:
            self.stages = [s.strip() for s in args.only.split(",")]
        elif plan.mode == "tiny":  # keeps the test short; --only video33,profiles runs those on CPU too
            self.stages = [s for s in STAGES if s not in ("video33", "profiles")]
        else:
            self.stages = list(STAGES)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise SystemExit(f"--only takes {', '.join(STAGES)}; got {', '.join(unknown)}")
        self.impls = [s.strip() for s in args.impl.split(",")]
        if not set(self.impls) <= {"worker", "plain"}:
            raise SystemExit(f"--impl takes worker, plain or both; got {args.impl}")
        self.size = "mini" if plan.mode == "tiny" else "full"
        self.results: dict[str, Any] = {"meta": {}, "build": {}, "disk": {}, "load": {}, "jobs": {}, "ratios": {},
                                        "cold_start": {}, "profiles": {}, "skipped": [], "errors": []}
        self.rates = {"load_gbps": 1.5, "step_s": {}}  # learned as the run goes, for the time budget
        self.cuda = False
        self.drop_caches = bool(args.drop_caches)
        if any("=" not in item for item in args.set or []):
            raise SystemExit(f"--set takes KEY=VALUE, got {args.set}")
        self.overrides = dict(item.split("=", 1) for item in (args.set or []))

    # ------------------------------------------------------------------ bookkeeping
    def log(self, text: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:7.1f}s] {text}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, what: str, estimate_s: float) -> bool:
        if self.plan.budget_s is None:
            return True
        left = self.plan.budget_s - self.elapsed()
        if estimate_s <= left:
            return True
        self.results["skipped"].append({"what": what, "why": f"time budget: needs ~{estimate_s:.0f}s, "
                                                           f"{max(left, 0):.0f}s of --budget-s left"})
        self.log(f"skip {what}: ~{estimate_s:.0f}s needed, {max(left, 0):.0f}s left in the budget")
        self.save()
        return False

    def error(self, what: str, err: BaseException) -> None:
        self.results["errors"].append({"what": what, "error": _err(err),
                                       "traceback": traceback.format_exc().splitlines()[-6:]})
        self.log(f"ERROR in {what}: {_err(err)}")
        self.save()

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = self.elapsed()
        self.results["ratios"] = compute_ratios(self.results)
        data = _round(self.results)
        path = self.out / "bench.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)
        (self.out / "bench.md").write_text(render_markdown(data))

    # ------------------------------------------------------------------ environment
    def record_meta(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available() and self.plan.mode != "tiny"
        meta: dict[str, Any] = {
            "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]), "mode": self.plan.mode,
            "stages": self.stages, "impls": self.impls, "plan": dataclasses.asdict(self.plan),
            "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count(), "workdir": str(self.workdir),
        }
        for name in ("diffusers", "transformers", "huggingface_hub", "accelerate", "safetensors", "imageio_ffmpeg",
                     "runpod"):
            try:
                meta[name] = __import__(name).__version__
            except Exception as err:  # noqa: BLE001 - record whatever is missing, keep going
                meta[name] = f"unavailable ({_err(err)})"
        try:
            import imageio_ffmpeg

            meta["ffmpeg"] = imageio_ffmpeg.get_ffmpeg_version()
        except Exception:  # noqa: BLE001 - informational only
            pass
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    meta["ram_gib"] = int(line.split()[1]) * 1024 / GIB
        for label, path in (("workdir_free_gib", self.workdir), ("devshm_free_gib", Path("/dev/shm"))):
            with contextlib.suppress(OSError):
                meta[label] = shutil.disk_usage(path).free / GIB
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            meta.update(gpu=torch.cuda.get_device_name(0), gpu_total_gib=props.total_memory / GIB)
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                      "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
                meta["nvidia_smi"] = smi.stdout.strip()
                meta["driver"] = smi.stdout.strip().split(",")[1].strip() if smi.stdout.strip() else None
            except (OSError, subprocess.SubprocessError, IndexError) as err:
                meta["driver"] = f"unavailable ({_err(err)})"
        else:
            meta["gpu"] = None
        if self.plan.mode == "tiny":
            meta["note"] = "tiny models on CPU: checks the code path, the figures mean nothing"
        meta["memory_override_field"] = memory_override_field()
        meta["worker_env_overrides"] = self.overrides
        try:
            meta["worker_settings"] = repr(worker_settings(worker_env(self.workdir, self.overrides)))
        except Exception as err:  # noqa: BLE001 - a bad --set value: reported, and every worker stage fails alike
            meta["worker_settings"] = f"invalid: {_err(err)}"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=10)
            meta["git"] = git.stdout.strip() or None
        self.results["meta"] = meta
        self.log(f"{meta.get('gpu') or 'CPU'} | torch {meta['torch']} | diffusers {meta['diffusers']} | "
                 f"transformers {meta['transformers']} | workdir {self.workdir} "
                 f"({meta.get('workdir_free_gib', 0):.0f} GiB free)")
        self.save()

    # ------------------------------------------------------------------ models on disk
    def ensure(self, group: str) -> bool:
        if group_ready(self.workdir, group, self.size):
            return True
        remove_group(self.workdir, group)  # leftovers of an interrupted build
        if self.size == "full":
            need = GROUP_BYTES_FULL[group] * 1.03 + 1e9
            free = shutil.disk_usage(self.workdir).free
            if free < need:
                for other in GROUP_FOLDERS:
                    if other != group and any((self.workdir / name).exists() for name in GROUP_FOLDERS[other]):
                        self.log(f"removing the {other} models to make room for {group}")
                        remove_group(self.workdir, other)
                free = shutil.disk_usage(self.workdir).free
            if free < need:
                self.results["errors"].append({
                    "what": f"build {group}",
                    "error": f"{free / 1e9:.1f} GB free in {self.workdir}, {need / 1e9:.1f} GB needed; "
                             f"point --workdir at a larger disk (or /dev/shm, which makes load figures RAM->GPU)"})
                self.save()
                return False
        device = "cuda" if self.cuda else "cpu"
        self.log(f"building {group} ({self.size} size, random weights) on {device} into {self.workdir}")
        try:
            rec = build_group(group, self.workdir, self.size, device, self.log)
        except Exception as err:  # noqa: BLE001 - record and carry on with what can still run
            self.error(f"build {group}", err)
            return False
        self.results["build"][group] = rec
        self.log(f"built {group}: {rec['bytes'] / 1e9:.1f} GB in {rec['total_s']:.0f}s")
        self.save()
        return True

    def disk_test(self) -> None:
        files = sorted(self.workdir.rglob("*.safetensors"), key=lambda p: p.stat().st_size, reverse=True)
        if not files:
            return
        path = files[0]
        limit = int(self.plan.disk_read_gib * GIB)
        method = evict_page_cache([path], self.drop_caches)
        n, cold_s = read_speed(path, limit)
        _, warm_s = read_speed(path, limit)

        def looks_cached(cold: float, warm: float) -> bool:
            return n / cold > 0.7 * (n / warm)

        if looks_cached(cold_s, warm_s) and not self.drop_caches and self.plan.mode != "tiny":
            # fadvise did not take (e.g. a filesystem that ignores it): drop the whole page cache instead.
            first = {"eviction": method, "cold_gb_per_s": n / cold_s / 1e9}
            method = evict_page_cache([path], drop_caches=True)
            n, cold_s = read_speed(path, limit)
            if not looks_cached(cold_s, warm_s):
                self.drop_caches = True  # use it for the cold starts too
            self.results["disk"]["first_try"] = first
        rec = {"file": str(path.relative_to(self.workdir)), "bytes_read": n, "eviction": method,
               "cold_read_s": cold_s, "cold_gb_per_s": n / cold_s / 1e9 if cold_s else None,
               "cached_read_s": warm_s, "cached_gb_per_s": n / warm_s / 1e9 if warm_s else None}
        if looks_cached(cold_s, warm_s):
            rec["warning"] = "the 'cold' read was about as fast as the cached one: the eviction probably failed"
        shards = sorted((self.workdir / "wan-i2v" / "transformer").glob("*.safetensors"))
        if len(shards) > 1:  # the same number of bytes again, spread over the shards and read concurrently
            from concurrent.futures import ThreadPoolExecutor

            evict_page_cache(shards, self.drop_caches)
            start = time.perf_counter()
            with ThreadPoolExecutor(len(shards)) as pool:
                parts = list(pool.map(lambda p: read_speed(p, limit // len(shards)), shards))
            seconds = time.perf_counter() - start
            rec["parallel"] = {"files": len(shards), "threads": len(shards), "bytes_read": sum(n for n, _ in parts),
                               "cold_gb_per_s": sum(n for n, _ in parts) / seconds / 1e9}
            self.log(f"disk: {len(shards)} files read at once: {rec['parallel']['cold_gb_per_s']:.2f} GB/s")
        if not self.plan.evict_loads:
            read_speed(path, path.stat().st_size)  # leave the whole file cached, as the loads that follow expect
        self.results["disk"].update(rec)
        self.log(f"disk: cold read {rec['cold_gb_per_s']:.2f} GB/s, cached {rec['cached_gb_per_s']:.2f} GB/s "
                 f"({n / 1e9:.1f} GB of {rec['file']}; {method})")
        self.save()

    # ------------------------------------------------------------------ estimates for the budget
    def est_load(self, nbytes: int, cold: bool = False) -> float:
        rate = self.rates["load_gbps"]
        if cold and self.results["disk"].get("cold_gb_per_s"):
            rate = min(rate, self.results["disk"]["cold_gb_per_s"])
        return nbytes / (rate * 1e9) + 10

    def est_video(self, spec: VideoSpec) -> float:
        default = {81: 7.0, 33: 2.2}.get(spec.frames, 7.0)
        per_step = self.rates["step_s"].get(spec.frames, default)
        overhead = 45 if spec.frames > 40 else 20
        return spec.steps * per_step + overhead

    def learn(self, rec: dict, load: dict | None = None) -> None:
        if load and load.get("gb_per_s"):
            self.rates["load_gbps"] = load["gb_per_s"]
        if rec and rec.get("step_s_steady"):
            self.rates["step_s"][rec["frames"]] = rec["step_s_steady"]

    # ------------------------------------------------------------------ stages
    def run(self) -> None:
        self.record_meta()
        with contextlib.suppress(Exception):  # loading progress bars only clutter the log
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
        if self.plan.mode != "tiny":
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("--quick/--full need a CUDA GPU; use --tiny on CPU")
        # Import the pipeline modules now, so the load figures of worker and plain exclude import time alike
        # (the cold starts include it).
        import diffusers  # noqa: F401
        from diffusers import StableDiffusionXLPipeline, WanImageToVideoPipeline  # noqa: F401
        from transformers import CLIPVisionModel, UMT5EncoderModel  # noqa: F401

        wan_stages = [s for s in ("video81", "video33", "cold", "profiles") if s in self.stages]
        want_sdxl = "image" in self.stages
        if self.args.only and "build" in self.stages:  # named explicitly: build both groups up front
            self.ensure("sdxl")
            self.ensure("wan")
        if want_sdxl and self.ensure("sdxl"):
            self.image_stage()
        if wan_stages and self.ensure("wan"):
            videos = [self.plan.videos[s] for s in ("video81", "video33") if s in self.stages]
            if videos:
                if "worker" in self.impls:
                    self.worker_wan(videos)
                if "plain" in self.impls:
                    self.plain_wan(videos)
            if "disk" in self.stages:  # late: the write-back of the build has had time to finish
                self.disk_test()
            if "cold" in self.stages and "worker" in self.impls:
                self.cold_worker()
            if "profiles" in self.stages:
                for card in self.plan.cards:
                    self.profile(card)
            if "cold" in self.stages and "plain" in self.impls:
                self.cold_plain()
        elif "disk" in self.stages and any(group_ready(self.workdir, g, self.size) for g in GROUP_FOLDERS):
            self.disk_test()
        self.results["meta"]["finished"] = True
        self.save()
        print()
        print(render_markdown(_round(self.results)))
        if self._own_workdir and not self.args.keep_models:
            shutil.rmtree(self._own_workdir, ignore_errors=True)

    def _jobs(self, impl: str) -> dict:
        return self.results["jobs"].setdefault(impl, {})

    def _loads(self, impl: str) -> dict:
        return self.results["load"].setdefault(impl, {})

    def _page_cache(self, files: list[Path]) -> str:
        if self.plan.evict_loads:
            return "evicted before loading: " + evict_page_cache(files, self.drop_caches)
        return "not evicted (files recently written or read; likely in the page cache)"

    def image_stage(self) -> None:
        steps, size = self.plan.image_steps, self.plan.image_size
        if "worker" in self.impls and self.fits("worker image", 60):
            self.worker_sdxl(steps, size)
        if "plain" in self.impls and self.fits("plain image", 60):
            self.plain_sdxl(steps, size)

    def worker_sdxl(self, steps: tuple[int, int], size: tuple[int, int]) -> None:
        import handler

        tracker = PhaseTracker(self.cuda)
        models = None
        try:
            models = handler.configure(worker_settings(worker_env(self.workdir, self.overrides)))
            files = worker_sdxl_files(self.workdir)
            cache = self._page_cache(files)
            seconds, load = measure_load(tracker, models.load_sdxl, sum(p.stat().st_size for p in files), cache)
            load["worker_reported_s"] = seconds
            load["placement"] = dataclasses.asdict(models.placement)
            load["warm_up_s"] = models.compile_now("image")  # as handler.main does at start-up
            self._loads("worker")["sdxl"] = load
            self.log(f"worker SDXL load {load['wall_s']:.1f}s ({load['gb_per_s']:.2f} GB/s)")
            hook_sdxl(tracker, models.base, models.refiner)
            rec = worker_image(tracker, steps, size)
            self._jobs("worker")["image"] = rec
            self.log(f"worker image: {rec.get('wall_s', 0):.1f}s {rec.get('error', '')}")
        except Exception as err:  # noqa: BLE001 - record and carry on
            self.error("worker image", err)
        finally:
            tracker.remove()
            if models is not None:
                models.base = models.refiner = None
            self.results["load"].setdefault("worker", {}).setdefault("sdxl", {})["left_allocated_gib"] = release_gpu()
            self.save()

    def plain_sdxl(self, steps: tuple[int, int], size: tuple[int, int]) -> None:
        tracker = PhaseTracker(self.cuda)
        pipes: tuple[Any, ...] = ()
        try:
            files = plain_sdxl_files(self.workdir)
            cache = self._page_cache(files)
            pipes, load = measure_load(
                tracker, lambda: plain_load_sdxl(self.workdir / "sdxl-base", self.workdir / "sdxl-refiner", self.cuda),
                sum(p.stat().st_size for p in files), cache)
            self._loads("plain")["sdxl"] = load
            self.log(f"plain SDXL load {load['wall_s']:.1f}s ({load['gb_per_s']:.2f} GB/s)")
            hook_sdxl(tracker, *pipes)
            rec = plain_image(tracker, *pipes, steps, size)
            self._jobs("plain")["image"] = rec
            self.log(f"plain image: {rec['wall_s']:.1f}s")
        except Exception as err:  # noqa: BLE001 - record and carry on
            self.error("plain image", err)
        finally:
            tracker.remove()
            pipes = ()
            release_gpu()
            self.save()

    def worker_wan(self, videos: list[VideoSpec]) -> None:
        import handler

        files = wan_files(self.workdir)
        nbytes = sum(p.stat().st_size for p in files)
        if not self.fits("worker Wan load", self.est_load(nbytes)):
            return
        tracker = PhaseTracker(self.cuda)
        models = None
        image_uri = png_data_uri(input_image(*self.plan.input_size))
        try:
            settings = worker_settings(worker_env(self.workdir, self.overrides))
            models = handler.configure(settings)
            cache = self._page_cache(files)
            seconds, load = measure_load(tracker, models.load_wan, nbytes, cache)
            load["worker_reported_s"] = seconds
            load["placement"] = dataclasses.asdict(models.placement)
            load["warm_up_s"] = models.compile_now("video")  # as handler.main does at start-up
            self._loads("worker")["wan"] = load
            self.learn({}, load)
            self.log(f"worker Wan load {load['wall_s']:.1f}s ({load['gb_per_s']:.2f} GB/s, {cache[:40]})")
            hook_wan(tracker, models.wan)
            for spec in videos:
                if not self.fits(f"worker {spec.name}", self.est_video(spec)):
                    continue
                try:
                    rec = worker_video(tracker, spec, image_uri)
                except Exception as err:  # noqa: BLE001 - record and carry on
                    self.error(f"worker {spec.name}", err)
                    continue
                rec["mp4_encode_realistic_s"] = self.realistic_mp4("worker", spec)
                self._jobs("worker")[spec.name] = rec
                self.learn(rec)
                self.log(f"worker {spec.name}: {rec.get('wall_s', 0):.1f}s, "
                         f"{rec.get('step_s_steady') or 0:.2f} s/step {rec.get('error', '')}")
                self.save()
        except Exception as err:  # noqa: BLE001 - record and carry on
            self.error("worker Wan", err)
        finally:
            tracker.remove()
            if models is not None:
                models.wan = None
            self.results["load"].setdefault("worker", {}).setdefault("wan", {})["left_allocated_gib"] = release_gpu()
            self.save()

    def plain_wan(self, videos: list[VideoSpec]) -> None:
        files = wan_files(self.workdir)
        nbytes = sum(p.stat().st_size for p in files)
        if not self.fits("plain Wan load", self.est_load(nbytes)):
            return
        tracker = PhaseTracker(self.cuda)
        pipe = None
        image = input_image(*self.plan.input_size)
        try:
            cache = self._page_cache(files)
            pipe, load = measure_load(tracker, lambda: plain_load_wan(self.workdir / "wan-i2v", self.cuda), nbytes,
                                      cache)
            self._loads("plain")["wan"] = load
            self.log(f"plain Wan load {load['wall_s']:.1f}s ({load['gb_per_s']:.2f} GB/s)")
            hook_wan(tracker, pipe)
            for spec in videos:
                if not self.fits(f"plain {spec.name}", self.est_video(spec)):
                    continue
                try:
                    rec = plain_video(tracker, pipe, spec, image, self.scratch / f"plain-{spec.name}.mp4")
                except Exception as err:  # noqa: BLE001 - record and carry on
                    self.error(f"plain {spec.name}", err)
                    continue
                rec["mp4_encode_realistic_s"] = self.realistic_mp4("plain", spec)
                self._jobs("plain")[spec.name] = rec
                self.log(f"plain {spec.name}: {rec['wall_s']:.1f}s, {rec['step_s_steady'] or 0:.2f} s/step")
                self.save()
        except Exception as err:  # noqa: BLE001 - record and carry on
            self.error("plain Wan", err)
        finally:
            tracker.remove()
            pipe = None
            release_gpu()
            self.save()

    def realistic_mp4(self, impl: str, spec: VideoSpec) -> float | None:
        """MP4 encode time of a clip with motion and grain: random-weight outputs encode unrealistically fast."""
        try:
            frames = synthetic_frames(spec.frames, spec.height, spec.width)
            start = time.perf_counter()
            if impl == "worker":
                from video_utils import frames_to_mp4

                frames_to_mp4(frames, 16)
            else:
                from diffusers.utils import export_to_video

                export_to_video([f.astype("float32") / 255.0 for f in frames], str(self.scratch / "synthetic.mp4"),
                                fps=16)
            return time.perf_counter() - start
        except Exception as err:  # noqa: BLE001 - informational figure
            self.error(f"{impl} realistic mp4", err)
            return None

    # ------------------------------------------------------------------ cold start
    def cold_worker(self) -> None:
        spec = self.plan.cold
        files = wan_files(self.workdir)
        nbytes = sum(p.stat().st_size for p in files)
        if not self.fits("worker cold start", 25 + self.est_load(nbytes, cold=True) + self.est_video(spec)):
            return
        job = {"input": video_input(spec, png_data_uri(input_image(*self.plan.input_size)))}
        env = worker_env(self.workdir, self.overrides)
        env["LOCAL_OUTPUT_DIR"] = str(self.scratch / "cold-out")
        eviction = evict_page_cache(files, self.drop_caches)
        cmd = [sys.executable, "handler.py", "--test_input", json.dumps(job)]
        timeout = 1200.0 if self.plan.budget_s is None else max(60.0, self.plan.budget_s - self.elapsed())
        self.log(f"cold start: python handler.py --test_input <video {spec.frames}f {spec.steps} steps>")
        run = run_timed(cmd, env, timeout, self.scratch / "cold-worker.log")
        rec: dict[str, Any] = {"command": "python handler.py --test_input '<json>'", "job": dataclasses.asdict(spec),
                               "eviction": eviction, "rc": run["rc"], "exit_s": run["exit_s"],
                               "timed_out": run["timed_out"], "bytes": nbytes}
        settings_line = _first(run["lines"], "worker settings")
        loaded_line = _first(run["lines"], "loaded on")
        result_line = _first(run["lines"], "Job result:")
        if settings_line:
            rec["imports_done_s"] = settings_line[0]
        if loaded_line:
            rec["model_loaded_s"] = loaded_line[0]
        if result_line:
            rec["start_to_result_s"] = result_line[0]
            try:
                result = ast.literal_eval(result_line[1].split("Job result:", 1)[1].strip())
                result = result.get("output", result)  # runpod wraps the handler's return value
                rec["timings"] = result.get("timings", {})
                load_s = rec["timings"].get("load_s")
                if load_s:
                    rec["load_gb_per_s"] = nbytes / load_s / 1e9
            except (ValueError, SyntaxError) as err:
                rec["parse_error"] = _err(err)
        if run["rc"] != 0 or not result_line:
            rec["error"] = "the worker exited without a result"
            rec["output_tail"] = _tail(run["lines"])
        self.results["cold_start"]["worker"] = rec
        self.log(f"cold start (worker): {rec.get('start_to_result_s', float('nan')):.1f}s to result, rc {run['rc']}")
        self.save()

    def cold_plain(self) -> None:
        spec = self.plan.cold
        files = wan_files(self.workdir)
        nbytes = sum(p.stat().st_size for p in files)
        if not self.fits("plain cold start", 25 + self.est_load(nbytes, cold=True) + self.est_video(spec)):
            return
        result_file = self.scratch / "cold-plain.json"
        result_file.unlink(missing_ok=True)
        env = worker_env(self.workdir)  # the plain recipe reads no worker settings
        eviction = evict_page_cache(files, self.drop_caches)
        env["BENCH_T0"] = repr(time.time())
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "plain-cold", "--workdir", str(self.workdir),
               "--_spec", json.dumps(dataclasses.asdict(spec)), "--_result-file", str(result_file),
               "--_input-size", ",".join(map(str, self.plan.input_size))]
        if self.plan.mode == "tiny":
            cmd.append("--tiny")
        timeout = 1200.0 if self.plan.budget_s is None else max(60.0, self.plan.budget_s - self.elapsed())
        self.log("cold start: plain diffusers recipe in a fresh process")
        run = run_timed(cmd, env, timeout, self.scratch / "cold-plain.log")
        rec: dict[str, Any] = {"eviction": eviction, "rc": run["rc"], "exit_s": run["exit_s"],
                               "timed_out": run["timed_out"], "bytes": nbytes, "job": dataclasses.asdict(spec)}
        if result_file.exists():
            rec.update(json.loads(result_file.read_text()))
            if rec.get("load_s"):
                rec["load_gb_per_s"] = nbytes / rec["load_s"] / 1e9
        else:
            rec["error"] = "the plain recipe exited without a result"
            rec["output_tail"] = _tail(run["lines"])
        self.results["cold_start"]["plain"] = rec
        self.log(f"cold start (plain): {rec.get('start_to_result_s', float('nan')):.1f}s to result, rc {run['rc']}")
        self.save()

    # ------------------------------------------------------------------ memory profiles
    def profile(self, card: str) -> None:
        if card not in CARDS:
            self.results["errors"].append({"what": f"profile {card}", "error": f"unknown card; use {list(CARDS)}"})
            return
        spec = self.plan.profile
        files = wan_files(self.workdir)
        nbytes = sum(p.stat().st_size for p in files)
        if not self.fits(f"profile {card} GB", 25 + self.est_load(nbytes) + self.est_video(spec) * 1.5):
            return
        result_file = self.scratch / f"profile-{card}.json"
        result_file.unlink(missing_ok=True)
        env = worker_env(self.workdir, self.overrides)
        env["GPU_MEMORY_GIB"] = str(CARDS[card])  # the worker plans placement for this card size
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "profile", "--_card", card,
               "--workdir", str(self.workdir), "--_spec", json.dumps(dataclasses.asdict(spec)),
               "--_result-file", str(result_file), "--_input-size", ",".join(map(str, self.plan.input_size))]
        if self.plan.mode == "tiny":
            cmd.append("--tiny")
        timeout = 1200.0 if self.plan.budget_s is None else max(60.0, self.plan.budget_s - self.elapsed())
        self.log(f"memory profile: {card} GB card emulated ({CARDS[card]} GiB), worker video {spec.frames}f")
        run = run_timed(cmd, env, timeout, self.scratch / f"profile-{card}.log")
        rec: dict[str, Any] = {"rc": run["rc"], "exit_s": run["exit_s"], "timed_out": run["timed_out"]}
        if result_file.exists():
            rec.update(json.loads(result_file.read_text()))
        else:
            rec["error"] = "the profile process exited without a result"
            rec["output_tail"] = _tail(run["lines"])
        self.results["profiles"][card] = rec
        self.log(f"profile {card} GB: {profile_status(rec)}")
        self.save()


# --------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------
def child_plain_cold(args: argparse.Namespace) -> int:
    t0 = float(os.environ.get("BENCH_T0", time.time()))
    import diffusers  # noqa: F401 - part of the cold start being timed
    import torch

    out: dict[str, Any] = {"imports_done_s": time.time() - t0}
    cuda = torch.cuda.is_available() and not args.tiny
    spec = VideoSpec(**json.loads(args._spec))
    tracker = PhaseTracker(cuda)
    try:
        start = time.perf_counter()
        pipe = plain_load_wan(Path(args.workdir) / "wan-i2v", cuda)
        out["load_s"] = time.perf_counter() - start
        out["model_loaded_s"] = time.time() - t0
        hook_wan(tracker, pipe)
        width, height = (int(x) for x in args._input_size.split(","))
        rec = plain_video(tracker, pipe, spec, input_image(width, height),
                          Path(args._result_file).with_suffix(".mp4"))
        out["start_to_result_s"] = time.time() - t0
        out["timings"] = {"load_s": out["load_s"], "inference_s": rec["wall_s"] - rec["mp4_encode_s"],
                          "encode_s": rec["mp4_encode_s"]}
    except Exception as err:  # noqa: BLE001 - reported to the parent
        out["error"] = _err(err)
    Path(args._result_file).write_text(json.dumps(_round(out)))
    return 0


def child_profile(args: argparse.Namespace) -> int:
    import torch

    import handler

    card = args._card
    card_gib = CARDS[card]
    spec = VideoSpec(**json.loads(args._spec))
    cuda = torch.cuda.is_available() and not args.tiny
    out: dict[str, Any] = {"card": f"{card} GB", "card_gib": card_gib}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        limit = card_gib * GIB - CONTEXT_GIB * GIB
        fraction = min(1.0, limit / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        out.update(device_total_gib=total / GIB, fraction=fraction, allocator_limit_gib=fraction * total / GIB)
    else:
        out["note"] = "no CUDA: no memory limit applied (checks the plumbing only)"
    field = memory_override_field()
    out["worker_override"] = field or ("none: Settings has no GPU-memory field, so the worker plans placement for "
                                       "the real device's total memory")
    settings = worker_settings(dict(os.environ))  # GPU_MEMORY_GIB and any --set values come in the environment
    models = handler.configure(settings)
    out["placement"] = dataclasses.asdict(models.placement)
    tracker = PhaseTracker(cuda)

    def write() -> None:
        Path(args._result_file).write_text(json.dumps(_round(out), default=str))

    try:
        seconds, load = measure_load(tracker, models.load_wan, sum(p.stat().st_size for p in
                                                                  wan_files(Path(args.workdir))), "as left by the run")
        load["worker_reported_s"] = seconds
        out["load"] = load
    except Exception as err:  # noqa: BLE001 - an OOM here is a result
        out["load_error"] = _err(err)
        out["phases"] = dict(tracker.phases)
        write()
        return 0
    write()
    hook_wan(tracker, models.wan)
    width, height = (int(x) for x in args._input_size.split(","))
    try:
        out["job"] = worker_video(tracker, spec, png_data_uri(input_image(width, height)))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        out["job"] = {"error": _err(err)}
    write()
    return 0


# --------------------------------------------------------------------------------------------
# Ratios and the markdown report
# --------------------------------------------------------------------------------------------
RATIO_FIGURES = {
    "video": ("step_s_steady", "denoise_s", "encode_s", "vae_encode_s", "vae_decode_s", "mp4_encode_s",
              "mp4_encode_realistic_s", "wall_s", "e2e_40_steps_s", "peak_allocated_gib", "peak_reserved_gib"),
    "image": ("base_step_s_steady", "refiner_step_s_steady", "encode_s", "vae_decode_s", "png_encode_s", "wall_s",
              "e2e_default_steps_s", "peak_allocated_gib", "peak_reserved_gib"),
    "load": ("wall_s", "gb_per_s", "peak_allocated_gib"),
    "cold": ("start_to_result_s", "imports_done_s", "model_loaded_s", "load_gb_per_s"),
}


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return None


def compute_ratios(results: dict) -> dict:
    """worker / plain for every figure both measured (below 1 means the worker is faster or smaller)."""
    ratios: dict[str, dict[str, float]] = {}
    jobs = results.get("jobs", {})
    worker, plain = jobs.get("worker", {}), jobs.get("plain", {})
    for name in sorted(set(worker) & set(plain)):
        figures = RATIO_FIGURES["image" if name == "image" else "video"]
        r = {f: _ratio(worker[name].get(f), plain[name].get(f)) for f in figures}
        ratios[name] = {k: v for k, v in r.items() if v is not None}
    loads = results.get("load", {})
    for group in ("wan", "sdxl"):
        w, p = loads.get("worker", {}).get(group, {}), loads.get("plain", {}).get(group, {})
        r = {f: _ratio(w.get(f), p.get(f)) for f in RATIO_FIGURES["load"]}
        if any(v is not None for v in r.values()):
            ratios[f"load_{group}"] = {k: v for k, v in r.items() if v is not None}
    cold = results.get("cold_start", {})
    r = {f: _ratio(cold.get("worker", {}).get(f), cold.get("plain", {}).get(f)) for f in RATIO_FIGURES["cold"]}
    if any(v is not None for v in r.values()):
        ratios["cold_start"] = {k: v for k, v in r.items() if v is not None}
    return ratios


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return str(value)


def profile_status(rec: dict) -> str:
    if rec.get("load_error"):
        return f"load failed: {rec['load_error']}"
    job = rec.get("job") or {}
    if job.get("error"):
        return f"job failed: {job['error']}"
    if rec.get("error"):
        return rec["error"]
    if job:
        return "ok"
    return "no result"


VIDEO_ROWS = (
    ("s/step (steady, CFG = 2 forwards)", "step_s_steady", 3),
    ("text + image encode s", "encode_s", 2),
    ("VAE encode s (conditioning)", "vae_encode_s", 2),
    ("denoise s (measured steps)", "denoise_s", 2),
    ("VAE decode s", "vae_decode_s", 2),
    ("MP4 encode s (model output)", "mp4_encode_s", 2),
    ("MP4 encode s (clip with motion + grain)", "mp4_encode_realistic_s", 2),
    ("end-to-end s (measured steps, wall)", "wall_s", 2),
    ("end-to-end s at 40 steps", "e2e_40_steps_s", 1),
    ("peak GiB allocated", "peak_allocated_gib", 2),
    ("peak GiB reserved", "peak_reserved_gib", 2),
)
IMAGE_ROWS = (
    ("base s/step (steady, CFG batch 2)", "base_step_s_steady", 4),
    ("refiner s/step (steady)", "refiner_step_s_steady", 4),
    ("text encode s", "encode_s", 3),
    ("VAE decode s", "vae_decode_s", 3),
    ("PNG encode s", "png_encode_s", 3),
    ("end-to-end s (measured steps, wall)", "wall_s", 2),
    ("end-to-end s at 25 + 50 steps (20 base + 10 refiner)", "e2e_default_steps_s", 2),
    ("peak GiB allocated", "peak_allocated_gib", 2),
    ("peak GiB reserved", "peak_reserved_gib", 2),
)
PHASE_ORDER = ("load", "prepare", "text_encode", "image_encode", "vae_encode", "other", "denoise", "denoise_base",
               "denoise_refiner", "vae_decode", "postprocess", "mp4_encode", "png_encode", "deliver")


def render_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [f"## Worker benchmark ({meta.get('mode', '?')}): {meta.get('gpu') or 'CPU'}, {meta.get('date_utc', '')}",
             "",
             f"torch {meta.get('torch')} (CUDA {meta.get('cuda_runtime')}), diffusers {meta.get('diffusers')}, "
             f"transformers {meta.get('transformers')}, driver {meta.get('driver', '-')}, "
             f"ffmpeg {meta.get('ffmpeg', '-')}. Random weights, real architectures, model-card dtypes.",
             f"Command: `{meta.get('command', '')}`"]
    if meta.get("note"):
        lines.append(f"**{meta['note']}**")
    lines += ["", "| job | figure | worker | plain diffusers | worker/plain |", "|---|---|---|---|---|"]
    jobs = results.get("jobs", {})
    worker, plain = jobs.get("worker", {}), jobs.get("plain", {})
    ratios = results.get("ratios", {})
    loads = results.get("load", {})
    for group, label in (("wan", "load Wan"), ("sdxl", "load SDXL")):
        w, p = loads.get("worker", {}).get(group, {}), loads.get("plain", {}).get(group, {})
        if not (w.get("wall_s") or p.get("wall_s")):
            continue
        r = ratios.get(f"load_{group}", {})
        lines.append(f"| {label} | seconds (disk->GPU) | {_fmt(w.get('wall_s'))} | {_fmt(p.get('wall_s'))} | "
                     f"{_fmt(r.get('wall_s'))} |")
        lines.append(f"| {label} | GB/s ({_fmt((w.get('bytes') or p.get('bytes') or 0) / 1e9, 1)} GB) | "
                     f"{_fmt(w.get('gb_per_s'))} | {_fmt(p.get('gb_per_s'))} | {_fmt(r.get('gb_per_s'))} |")
    for name in ("video81", "video33", "image"):
        w, p = worker.get(name, {}), plain.get(name, {})
        if not (w or p):
            continue
        ref = w if w.get("wall_s") and not w.get("error") else p
        if name == "image":
            title = (f"image {ref.get('height')}x{ref.get('width')} ({ref.get('base_steps_run')} base + "
                     f"{ref.get('refiner_steps_run')} refiner steps)")
            rows = IMAGE_ROWS
        else:
            title = (f"video {ref.get('height')}x{ref.get('width')}, {ref.get('frames')} frames "
                     f"({ref.get('steps')} steps)")
            rows = VIDEO_ROWS
        for side, rec in (("worker", w), ("plain", p)):
            if rec.get("error"):
                lines.append(f"| {title} | {side} error | {rec['error'][:200]} | | |")
        for label, key, digits in rows:
            if w.get(key) is None and p.get(key) is None:
                continue
            extrapolated = w.get("e2e_40_steps_extrapolated") or w.get("e2e_default_steps_extrapolated") or \
                p.get("e2e_40_steps_extrapolated") or p.get("e2e_default_steps_extrapolated")
            if key in ("e2e_40_steps_s", "e2e_default_steps_s") and extrapolated:
                label += " (extrapolated)"
            lines.append(f"| {title} | {label} | {_fmt(w.get(key), digits)} | {_fmt(p.get(key), digits)} | "
                         f"{_fmt(ratios.get(name, {}).get(key))} |")
    cold = results.get("cold_start", {})
    if cold:
        w, p = cold.get("worker", {}), cold.get("plain", {})
        job = (w or p).get("job", {})
        title = f"cold start (new process, video {job.get('frames')}f, {job.get('steps')} steps)"
        r = ratios.get("cold_start", {})
        for side, rec in (("worker", w), ("plain", p)):
            if rec.get("error"):
                tail = " / ".join(rec.get("output_tail", [])[-3:])
                lines.append(f"| {title} | {side} error | {(rec['error'] + ': ' + tail)[:300]} | | |")
        for label, key in (("process start -> result s", "start_to_result_s"),
                           ("process start -> imports done s", "imports_done_s"),
                           ("process start -> model loaded s", "model_loaded_s"),
                           ("load GB/s (page cache evicted)", "load_gb_per_s")):
            lines.append(f"| {title} | {label} | {_fmt(w.get(key))} | {_fmt(p.get(key))} | {_fmt(r.get(key))} |")
    disk = results.get("disk", {})
    if disk:
        lines.append(f"| disk | sequential read GB/s, page cache evicted ({_fmt(disk.get('bytes_read', 0) / 1e9, 1)} "
                     f"GB) | {_fmt(disk.get('cold_gb_per_s'))} | | |")
        lines.append(f"| disk | same read from the page cache GB/s | {_fmt(disk.get('cached_gb_per_s'))} | | |")
        if disk.get("parallel"):
            par = disk["parallel"]
            lines.append(f"| disk | {par['files']} shards read at once GB/s, page cache evicted | "
                         f"{_fmt(par.get('cold_gb_per_s'))} | | |")
    # Per-phase peaks
    phase_rows = []
    for impl, group in (("worker", worker), ("plain", plain)):
        for name in ("video81", "video33", "image"):
            rec = group.get(name)
            if not rec or not rec.get("phases"):
                continue
            load = loads.get(impl, {}).get("sdxl" if name == "image" else "wan", {})
            cells = {"load": (load.get("peak_allocated_gib"), load.get("peak_reserved_gib"), load.get("wall_s"))}
            for phase, p in rec["phases"].items():
                cells[phase] = (p.get("peak_allocated_gib"), p.get("peak_reserved_gib"), p.get("s"))
            phase_rows.append((f"{impl} {name}", cells))
    if phase_rows:
        used = [p for p in PHASE_ORDER if any(p in cells for _, cells in phase_rows)]
        lines += ["", "Per phase: seconds / peak GiB allocated / peak GiB reserved (peaks reset at each boundary)",
                  "", "| run | " + " | ".join(used) + " |", "|---|" + "---|" * len(used)]
        for label, cells in phase_rows:
            row = []
            for phase in used:
                if phase in cells:
                    a, r, s = cells[phase]
                    row.append(f"{_fmt(s, 2)} / {_fmt(a, 1)} / {_fmt(r, 1)}")
                else:
                    row.append("")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    profiles = results.get("profiles", {})
    if profiles:
        lines += ["", "Memory profiles (worker, video job; card emulated with set_per_process_memory_fraction)", "",
                  "| card | allocator limit GiB | worker override | placement | result | peak GiB alloc / reserved | "
                  "s/step | load s |", "|---|---|---|---|---|---|---|---|"]
        for card, rec in profiles.items():
            job = rec.get("job") or {}
            placement = rec.get("placement") or {}
            place = ", ".join(f"{k}={v}" for k, v in placement.items()) or "-"
            override = rec.get("worker_override", "-")
            override = override if len(str(override)) < 30 else "none (plans for the device total)"
            peak_a = max([job.get("peak_allocated_gib") or 0, (rec.get("load") or {}).get("peak_allocated_gib") or 0])
            peak_r = max([job.get("peak_reserved_gib") or 0, (rec.get("load") or {}).get("peak_reserved_gib") or 0])
            lines.append(f"| {card} GB | {_fmt(rec.get('allocator_limit_gib'), 1)} | {override} | {place} | "
                         f"{profile_status(rec)[:300]} | {_fmt(peak_a, 1)} / {_fmt(peak_r, 1)} | "
                         f"{_fmt(job.get('step_s_steady'), 3)} | {_fmt((rec.get('load') or {}).get('wall_s'), 1)} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in results["skipped"])]
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{e['what']}: {e['error']}" for e in results["errors"])]
    lines += ["", "worker/plain below 1 means the worker is faster (times) or smaller (memory). s/step is the median "
                  "of the steps after the first. Figures marked extrapolated are measured time minus measured "
                  "denoising plus the default step count times s/step. In one process the worker runs before plain "
                  "diffusers, so one-time CUDA warm-ups (kernel loading) land on the worker's first job. The "
                  "worker's image job uses its default DDIM scheduler and the fp16-fix VAE (fp16 decode); the model "
                  "card uses the checkpoint's Euler scheduler and the base VAE, which upcasts to fp32 to decode."]
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: Path) -> int:
    merged: dict[str, Any] = {}
    commands = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        commands.append(data.get("meta", {}).get("command"))
        _deep_merge(merged, data)
    merged.setdefault("meta", {})["command"] = " ; ".join(c for c in commands if c)
    merged["ratios"] = compute_ratios(merged)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(merged, indent=1, default=str))
    text = render_markdown(merged)
    (out / "bench.md").write_text(text)
    print(text)
    return 0


# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="(default) few steps, one H100 command under 10 minutes")
    mode.add_argument("--full", action="store_true", help="default step counts (40 video, 25+50 image), all profiles")
    mode.add_argument("--tiny", action="store_true", help="tiny models on CPU: the same code path, for tests")
    p.add_argument("--only", help=f"comma-separated stages: {','.join(STAGES)} (default: all)")
    p.add_argument("--impl", default="worker,plain", help="worker, plain or both (default)")
    p.add_argument("--workdir", help="folder of the random-weight models (default /tmp/bench-models; tiny: a temp dir)")
    p.add_argument("--out", help="results folder (default $OUT, else ./bench-out)")
    p.add_argument("--video-steps", type=int, help="denoising steps per video job (quick 2, full 40)")
    p.add_argument("--image-steps", help="BASE,REFINER steps of the image job (quick 10,10; full 25,50)")
    p.add_argument("--cold-steps", type=int, help="steps of the cold-start video job (default 2)")
    p.add_argument("--profile-steps", type=int, help="steps of the memory-profile video job (quick 2, full 3)")
    p.add_argument("--cards", help=f"memory profiles to run, from {','.join(CARDS)} (quick: 48; full: all)")
    p.add_argument("--budget-s", type=float,
                   help="seconds from the start: skip what would not finish by then (quick: 540; 0: none)")
    p.add_argument("--evict-loads", action=argparse.BooleanOptionalAction, default=None,
                   help="drop the models from the page cache before each in-process load (full: yes, quick: no)")
    p.add_argument("--drop-caches", action="store_true",
                   help="also empty the whole page cache (root) when evicting; used anyway if fadvise fails")
    p.add_argument("--disk-read-gib", type=float, help="how much of one file the disk test reads (default 8)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="worker environment variable for the worker's runs, e.g. --set WAN_COMPILE=1")
    p.add_argument("--keep-models", action="store_true", help="tiny: keep the temporary model folder")
    p.add_argument("--verbose", action="store_true", help="show the worker's own INFO logs")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine bench.json files of several runs into --out")
    p.add_argument("--_child", choices=("plain-cold", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--_card", help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    p.add_argument("--_result-file", help=argparse.SUPPRESS)
    p.add_argument("--_input-size", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        return merge(args.merge, Path(args.out or os.environ.get("OUT") or "bench-out"))
    if args._child == "plain-cold":
        return child_plain_cold(args)
    if args._child == "profile":
        return child_profile(args)
    plan = make_plan(args)
    bench = Bench(args, plan)
    try:
        bench.run()
    except KeyboardInterrupt:
        bench.results["errors"].append({"what": "run", "error": "interrupted"})
        bench.save()
        raise
    return 0 if not bench.results["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
