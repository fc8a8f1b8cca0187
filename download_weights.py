"""Fetch the worker's model weights, or build tiny random stand-ins of the same classes.

Real weights (needs the Hugging Face hub):
    python download_weights.py                      # SDXL base + refiner + fp16-fix VAE, Wan2.1 I2V
    python download_weights.py --only wan --dir /runpod-volume/models [--fp8]
Random-weight stand-ins of the same classes (offline), tiny for the demo and the tests, or full size
(the real architectures, ~61 GB; built on the GPU when there is one) for benchmarks/:
    python download_weights.py --tiny models/tiny
    python download_weights.py --random-full /tmp/bench-models [--only wan]

Real weights land in the Hugging Face cache (HF_HOME, e.g. /runpod-volume/huggingface-cache
on a RunPod network volume) or, with --dir, in one folder per model; the worker then finds
them through SDXL_MODEL_ID / SDXL_REFINER_ID / SDXL_VAE_ID / WAN_MODEL_ID (hub ids or folders)
or MODEL_DIR. With --dir, Wan's transformer and text encoder, which the hub stores in float32
(90.1 GB in all), are re-saved in bf16, the dtype the worker runs them in (47 GB): every cold
start then reads half the bytes. `--compact DIR/wan-i2v` does that for a folder fetched earlier.
`--fp8` also stores the float8 transformer WAN_FP8 runs (DIR/wan-i2v/transformer-fp8, half the bf16
one's bytes), which a WAN_FP8 worker reads instead of quantizing at start.
The random models mirror the real repositories' layout (model_index.json, one subfolder per
component, fp16 variant files for SDXL) so the worker's real loading code runs on them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

# The table of real models and the retry wrapper are shared with the worker, which fetches missing weights itself.
from weights import FLOAT8_TRANSFORMER, GROUPS, REAL_MODELS, with_retries

# Wan components the worker runs in bf16 but the hub stores in float32; the others stay as stored
# (the VAE and CLIP image encoder run in float32, as the model card says).
COMPACT_COMPONENTS = ("transformer", "text_encoder")


def float32_share(folder: Path) -> float:
    """Fraction of a component's safetensors bytes stored as float32, read from the file headers only.

    A safetensors file starts with an 8-byte little-endian length and a JSON header giving each
    tensor's dtype and byte range.
    """
    f32 = total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                size = info["data_offsets"][1] - info["data_offsets"][0]
                total += size
                f32 += size if info["dtype"] == "F32" else 0
    return f32 / total if total else 0.0


def compact_wan(folder: Path) -> list[str]:
    """Re-save Wan's transformer and UMT5 encoder in bf16, as the worker loads them; returns what changed.

    from_pretrained(dtype=bfloat16) then save_pretrained writes exactly the tensors the worker would
    hold, including the few modules the model class keeps in float32. A component already mostly
    bf16 is left alone, so running this again costs nothing.
    """
    import torch
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    classes = {"transformer": WanTransformer3DModel, "text_encoder": UMT5EncoderModel}
    changed = []
    for sub in COMPACT_COMPONENTS:
        src = folder / sub
        if float32_share(src) < 0.5:  # compact already: only the kept-in-float32 modules are float32
            continue
        start = time.perf_counter()
        model = classes[sub].from_pretrained(str(src), dtype=torch.bfloat16)
        tmp, old = src.with_name(sub + ".bf16-tmp"), src.with_name(sub + ".fp32-old")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), max_shard_size="5GB")
        del model
        src.rename(old)  # swap, then delete: a crash in between leaves one complete copy
        tmp.rename(src)
        shutil.rmtree(old)
        changed.append(sub)
        print(f"{folder.name}/{sub}: re-saved in bf16 in {time.perf_counter() - start:.0f}s", flush=True)
    return changed


def store_fp8(folder: Path) -> None:
    """WAN_FP8's transformer beside the bf16 one (folder/transformer-fp8, about half its bytes): a float8 worker
    reads it straight onto the GPU instead of reading the bf16 one and quantizing it at every start. LoRA fusing
    still reads the bf16 weights, so both stay."""
    import torch
    from diffusers import WanTransformer3DModel

    from models import float8

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformer = WanTransformer3DModel.from_pretrained(str(folder / "transformer"), dtype=torch.bfloat16).to(device)
    float8.quantize(transformer)
    tmp, target = folder / (FLOAT8_TRANSFORMER + ".tmp"), folder / FLOAT8_TRANSFORMER
    shutil.rmtree(tmp, ignore_errors=True)
    float8.save(transformer, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # whole or absent: the worker never reads a half-written one
    print(f"{folder.name}/{FLOAT8_TRANSFORMER}: written in {time.perf_counter() - start:.0f}s", flush=True)


def is_compact_wan(folder: Path) -> bool:
    return (folder / "model_index.json").exists() and all(
        (folder / sub).is_dir() and float32_share(folder / sub) < 0.5 for sub in COMPACT_COMPONENTS)


def download_real(names: list[str], target_dir: Path | None) -> dict[str, str]:
    """Download the named real models; returns name -> local path (the value to put in the env var)."""
    from huggingface_hub import snapshot_download

    paths = {}
    for name in names:
        spec = REAL_MODELS[name]
        local_dir = str(target_dir / name) if target_dir else None
        if name == "wan-i2v" and target_dir and is_compact_wan(target_dir / name):
            # The hub's files differ from the compacted ones, so fetching again would re-download 90 GB.
            print(f"{name}: {local_dir} is complete and compacted already; delete it to fetch again", flush=True)
            paths[name] = local_dir
            continue
        paths[name] = with_retries(
            lambda spec=spec, local_dir=local_dir: snapshot_download(
                spec["repo_id"], allow_patterns=spec["allow_patterns"], local_dir=local_dir
            ),
            spec["repo_id"],
        )
        print(f"{name}: {paths[name]}", flush=True)
        if name == "wan-i2v" and target_dir:
            compact_wan(target_dir / name)
    return paths


# --------------------------------------------------------------------------------------
# Random-weight models of the real classes, in the real repositories' layout, so the worker's
# own loading code runs on them. "tiny" (a few MB, CPU, offline) is what the tests and the demo
# use; its sizes follow diffusers' own pipeline tests, and the tests compare its outputs with
# plain diffusers bit for bit, so its configs and seeds stay as they are. "full" is the real
# architecture: a forward pass costs the same whatever the weights hold, so it gives honest
# speed and memory figures (benchmarks/). One table holds both sizes of every component.
# --------------------------------------------------------------------------------------

_CLIP_TEXT_TINY = dict(
    bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
    num_attention_heads=4, num_hidden_layers=2, vocab_size=200, max_position_embeddings=77, hidden_act="gelu",
)
_SDXL_UNET_TINY = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), norm_num_groups=32,
)
_SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=False,
)

# component: its class ("library.Class", with the config class for transformers models), the seed it is
# built with, the dtype the real repository stores it in (tiny models are built in float32, as before),
# and its config at each size. Token ids of the full text encoders follow the tiny character tokenizers
# (bos 0, eos 1): the tokenizers are the tiny ones at both sizes; speed does not depend on them.
RANDOM_MODELS: dict[str, dict] = {
    # madebyollin/sdxl-vae-fp16-fix (four blocks: spatial factor 8, as in SDXL).
    "sdxl_vae": dict(cls="diffusers.AutoencoderKL", seed=0, dtype="float32",
                     tiny=dict(_SDXL_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                               sample_size=128),
                     full=dict(_SDXL_VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                               norm_num_groups=32, sample_size=1024)),
    # CLIP ViT-L text encoder and OpenCLIP bigG (with projection).
    "clip_l": dict(cls="transformers.CLIPTextModel:CLIPTextConfig", seed=1, dtype="float16", tiny=_CLIP_TEXT_TINY,
                   full=dict(_CLIP_TEXT_TINY, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)),
    "clip_g": dict(cls="transformers.CLIPTextModelWithProjection:CLIPTextConfig", seed=2, dtype="float16",
                   tiny=dict(_CLIP_TEXT_TINY, projection_dim=32),
                   full=dict(_CLIP_TEXT_TINY, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                             num_attention_heads=20, projection_dim=1280, vocab_size=49408)),
    # Base: time ids (6 x 256) + pooled text (1280) = 2816 (tiny: 6 x 8 + 32 = 80).
    "sdxl_unet": dict(cls="diffusers.UNet2DConditionModel", seed=3, dtype="float16",
                      tiny=dict(_SDXL_UNET_TINY, projection_class_embeddings_input_dim=80, cross_attention_dim=64),
                      full=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=256,
                                projection_class_embeddings_input_dim=2816)),
    # Refiner: 5 time ids (aesthetic score) + pooled text; 4 levels, cross-attention in the middle two.
    "refiner_unet": dict(cls="diffusers.UNet2DConditionModel", seed=4, dtype="float16",
                         tiny=dict(_SDXL_UNET_TINY, projection_class_embeddings_input_dim=72, cross_attention_dim=32),
                         full=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                                   block_out_channels=(384, 768, 1536, 1536),
                                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                     "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                   "UpBlock2D"),
                                   attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
                                   transformer_layers_per_block=4, use_linear_projection=True,
                                   addition_embed_type="text_time", addition_time_embed_dim=256,
                                   projection_class_embeddings_input_dim=2560)),
    "wan_vae": dict(cls="diffusers.AutoencoderKLWan", seed=10, dtype="float32",
                    tiny=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                              temperal_downsample=[False, True, True]),
                    full={}),  # the class defaults are the real config
    "umt5": dict(cls="transformers.UMT5EncoderModel:UMT5Config", seed=11, dtype="bfloat16",
                 tiny=dict(vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
                 full=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                           feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                           relative_attention_max_distance=128, dense_act_fn="gelu_new", is_gated_act=True,
                           tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)),
    # CLIP ViT-H/14 at 224: 256 patches + CLS = 257 tokens (tiny: image 32 / patch 2 gives the same count).
    "clip_vision": dict(cls="transformers.CLIPVisionModel:CLIPVisionConfig", seed=12, dtype="float32",
                        tiny=dict(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, intermediate_size=16, patch_size=2),
                        full=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
                                  hidden_act="gelu")),
    # The I2V transformer has image_dim (CLIP width) and added_kv_proj_dim (= its inner dim).
    "wan_transformer": dict(cls="diffusers.WanTransformer3DModel", seed=13, dtype="bfloat16",
                            tiny=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=36, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                                      image_dim=4, added_kv_proj_dim=24, rope_max_seq_len=1024),
                            full=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                      in_channels=36, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                      num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024)),
}
WAN_IMAGE_PROCESSOR = {"tiny": dict(crop_size=32, size=32), "full": dict(crop_size=224, size=224)}


def random_component(name: str, size: str, device: str = "cpu"):
    """One component with random weights: seeded, built directly on `device` in its stored dtype (full size)."""
    import importlib

    import torch

    spec = RANDOM_MODELS[name]
    module, _, classes = spec["cls"].partition(".")
    model_cls, _, config_cls = classes.partition(":")
    lib = importlib.import_module(module)
    config = spec[size]
    dtype = getattr(torch, spec["dtype"]) if size == "full" else torch.float32
    torch.manual_seed(spec["seed"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(lib, model_cls)(getattr(lib, config_cls)(**config)) if config_cls else \
                getattr(lib, model_cls)(**config)
    finally:
        torch.set_default_dtype(previous)
    if size == "full":  # small weights keep 40 random layers' activations finite in bf16 / fp16
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.02)
    return model


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # A character-level BPE (no merges): every printable ASCII character is a token, so any
    # prompt tokenizes without unknown-token surprises.
    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("\u2581" + chr(c), -2.5) for c in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # The real SDXL base/refiner scheduler config.
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    )


def _build_sdxl(out: Path, size: str, device: str) -> None:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    vae = random_component("sdxl_vae", size, device)
    vae.save_pretrained(out / "sdxl-vae")  # float32 file, as the fp16-fix repository
    if size == "full":
        vae.register_to_config(force_upcast=True)  # the base and refiner repositories' own VAE upcasts to decode
    text_encoder_2 = random_component("clip_g", size, device)
    base = StableDiffusionXLPipeline(
        vae=vae, text_encoder=random_component("clip_l", size, device), text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer(), unet=random_component("sdxl_unet", size, device),
        scheduler=_sdxl_scheduler(), force_zeros_for_empty_prompt=True,
    )
    # Saved as the fp16 variant in fp16, as the real repositories; the worker (like worker-sdxl)
    # loads variant="fp16" (and casts to float32 on CPU).
    base.to(dtype=torch.float16).save_pretrained(out / "sdxl-base", variant="fp16")
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=_clip_tokenizer(),
        unet=random_component("refiner_unet", size, device), scheduler=_sdxl_scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    refiner.to(dtype=torch.float16).save_pretrained(out / "sdxl-refiner", variant="fp16")


def _build_wan(out: Path, size: str, device: str) -> None:
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor

    pipe = WanImageToVideoPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=random_component("umt5", size, device),
        vae=random_component("wan_vae", size, device),
        # The real checkpoint's scheduler: UniPC in flow-matching mode, shift 3.0 for 480P.
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          num_train_timesteps=1000, flow_shift=3.0),
        image_processor=CLIPImageProcessor(**WAN_IMAGE_PROCESSOR[size]),
        image_encoder=random_component("clip_vision", size, device),
        transformer=random_component("wan_transformer", size, device),
    )
    # Full size: transformer and UMT5 in bf16, image encoder and VAE in float32 (the model card's dtypes), in
    # 5 GB shards, as `--dir` / `--compact` leave the hub's files: what a cold start reads.
    pipe.save_pretrained(out / "wan-i2v", **({"max_shard_size": "5GB"} if size == "full" else {}))


def random_ready(out: Path, group: str, size: str) -> bool:
    """Whether build_random finished this group at this size in `out` (it writes the marker last)."""
    marker = out / f".random-{group}.json"
    try:
        return json.loads(marker.read_text()).get("size") == size and all(
            (out / folder / "model_index.json").exists() or (out / folder / "config.json").exists()
            for folder in GROUPS[group])
    except (OSError, ValueError):
        return False


def build_random(out: Path, size: str = "tiny", only: set[str] | None = None) -> dict[str, float]:
    """Write random-weight models ("tiny" or "full" size) of `only` groups (default both) into out/<folder>.

    Full size builds on the GPU when there is one (~61 GB written). Returns seconds per group.
    """
    import gc

    import torch

    device = "cuda" if size == "full" and torch.cuda.is_available() else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for group, build in (("sdxl", _build_sdxl), ("wan", _build_wan)):
        if only is not None and group not in only:
            continue
        start = time.perf_counter()
        (out / f".random-{group}.json").unlink(missing_ok=True)  # first: a half-written group is never "ready"
        for folder in GROUPS[group]:
            shutil.rmtree(out / folder, ignore_errors=True)
        build(out, size, device)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        (out / f".random-{group}.json").write_text(json.dumps({"size": size}))
        seconds[group] = time.perf_counter() - start
        print(f"{group}: {size}-size random models written to {out} in {seconds[group]:.0f}s", flush=True)
    return seconds


def build_tiny(out: Path) -> None:
    build_random(out, "tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", metavar="DIR", type=Path, help="build tiny random models into DIR (offline)")
    parser.add_argument("--random-full", metavar="DIR", type=Path,
                        help="build full-size random-weight models into DIR (real architectures, for benchmarks; "
                             "~61 GB, built on the GPU when there is one)")
    parser.add_argument("--only", choices=sorted(GROUPS), help="fetch (or build) only SDXL or only Wan")
    parser.add_argument("--dir", type=Path, help="download into DIR/<model> instead of the HF cache")
    parser.add_argument("--compact", metavar="WAN_DIR", type=Path,
                        help="re-save a downloaded Wan folder's float32 transformer and text encoder in bf16")
    parser.add_argument("--fp8", action="store_true",
                        help="also store WAN_FP8's float8 transformer beside the bf16 one (Wan folders this writes)")
    args = parser.parse_args(argv)
    if args.tiny or args.random_full:
        out = args.tiny or args.random_full
        build_random(out, "tiny" if args.tiny else "full", {args.only} if args.only else None)
        if args.fp8 and args.only != "sdxl":
            store_fp8(out / "wan-i2v")
        return 0
    if args.compact:
        if not (args.compact / "model_index.json").exists():
            parser.error(f"--compact {str(args.compact)!r} is not a Wan model folder (no model_index.json)")
        print(json.dumps({"compacted": compact_wan(args.compact)}))
        if args.fp8:
            store_fp8(args.compact)
        return 0
    names = GROUPS[args.only] if args.only else [n for group in GROUPS.values() for n in group]
    paths = download_real(names, args.dir)
    if args.fp8 and "wan-i2v" in paths:
        store_fp8(Path(paths["wan-i2v"]))
    if args.dir:
        print("set: " + " ".join(f"{REAL_MODELS[n]['env']}={p}" for n, p in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
