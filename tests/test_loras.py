"""LoRAs in both modes and the fast video preset, on the tiny models with synthetic LoRA files.

Every supported key format is written by the tests themselves from one random LoRA in
diffusers' own layout, so the formats can be checked against each other: the same weights
in diffusers/PEFT, lightx2v/Kijai (`diffusion_model.*`) and musubi form give the same video,
and kohya gives the same SDXL UNet as PEFT.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode_data_uri, png_b64, png_image
from safetensors.torch import save_file

import loras
from errors import InputError
from lora_source import parse_source
from model_handler import ModelHandler
from plan import decide
from schemas import validate_input
from settings import Settings, SettingsError, load_settings
from worker import Worker

RANK = 4
# guidance 1.0: one transformer call per step and no negative prompt to encode (keeps the tests fast).
VIDEO = {"mode": "video", "prompt": "a cat walks", "image_url": "unused", "height": 64, "width": 64,
         "num_frames": 5, "num_inference_steps": 2, "guidance_scale": 1.0, "seed": 3}
IMAGE = {"prompt": "a red car", "height": 128, "width": 128, "num_inference_steps": 2,
         "refiner_inference_steps": 4, "seed": 5}


# ------------------------------------------------------------------------- LoRA files
# Wan2.1 module names: diffusers -> the original checkpoint's (lightx2v/Kijai, musubi).
WAN_NAMES = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
             "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
             "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img",
             "attn2.add_v_proj": "cross_attn.v_img", "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
WAN_SHAPES = {"ffn.net.0.proj": (24, 32), "ffn.net.2": (32, 24)}  # (in, out); every other linear is 24 -> 24


def wan_lora(seed: int, i2v: bool = True) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny Wan transformer, in diffusers' layout (module -> A, B)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block in (0, 1):
        for name in WAN_NAMES:
            if "add_" in name and not i2v:
                continue
            fan_in, fan_out = WAN_SHAPES.get(name, (24, 24))
            out[f"blocks.{block}.{name}"] = (torch.randn(RANK, fan_in, generator=gen) * 0.4,
                                             torch.randn(fan_out, RANK, generator=gen) * 0.4)
    return out


def as_peft(lora: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for m, (a, b) in lora.items()
            for k, v in ((f"{prefix}{m}.lora_A.weight", a), (f"{prefix}{m}.lora_B.weight", b))}


def as_wan_original(lora: dict) -> dict[str, torch.Tensor]:
    """lightx2v/Kijai: the original Wan names under diffusion_model., lora_down/lora_up and an alpha.

    alpha = rank / 2 makes diffusers scale the down matrix by 1/2, so it is stored doubled.
    """
    out = {}
    for module, (a, b) in lora.items():
        block, name = module.split(".", 2)[1], module.split(".", 2)[2]
        key = f"diffusion_model.blocks.{block}.{WAN_NAMES[name]}"
        out |= {f"{key}.lora_down.weight": a * 2, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(RANK / 2)}
    return out


def as_musubi(lora: dict) -> dict[str, torch.Tensor]:
    """musubi-tuner: lora_unet_blocks_0_self_attn_q.lora_down.weight, every module with its alpha."""
    out = {}
    for module, (a, b) in lora.items():
        block, name = module.split(".", 2)[1], module.split(".", 2)[2]
        key = f"lora_unet_blocks_{block}_{WAN_NAMES[name].replace('.', '_')}"
        out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(float(RANK))}
    return out


# The tiny SDXL UNet's attention blocks: diffusers name -> kohya's (SGM) name. Down block 1 of a
# 2-layers-per-block UNet is input_blocks 4 and 5; its transformer is their second part (_1).
SDXL_BLOCKS = {"down_blocks.1.attentions.0": "input_blocks_4_1", "down_blocks.1.attentions.1": "input_blocks_5_1"}


def sdxl_lora(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block in SDXL_BLOCKS:
        for t in (0, 1):
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):  # all 64 -> 64 (cross-attention dim 64)
                    out[f"{block}.transformer_blocks.{t}.{attn}.{proj}"] = (
                        torch.randn(RANK, 64, generator=gen) * 0.3, torch.randn(64, RANK, generator=gen) * 0.3)
    return out


def as_kohya(lora: dict, text_encoders: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in lora.items():
        block, rest = module.split(".transformer_blocks.")
        key = f"lora_unet_{SDXL_BLOCKS[block]}_transformer_blocks_{rest.replace('.', '_')}"
        out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(float(RANK))}
    if text_encoders:  # both CLIP encoders (hidden size 32), as kohya's SDXL trainer writes them
        gen = torch.Generator().manual_seed(seed)
        for te in ("te1", "te2"):
            for layer in (0, 1):
                for proj, fan_in, fan_out in (("self_attn_q_proj", 32, 32), ("self_attn_k_proj", 32, 32),
                                              ("self_attn_v_proj", 32, 32), ("self_attn_out_proj", 32, 32),
                                              ("mlp_fc1", 32, 37), ("mlp_fc2", 37, 32)):
                    key = f"lora_{te}_text_model_encoder_layers_{layer}_{proj}"
                    out |= {f"{key}.lora_down.weight": torch.randn(RANK, fan_in, generator=gen) * 0.3,
                            f"{key}.lora_up.weight": torch.randn(fan_out, RANK, generator=gen) * 0.3,
                            f"{key}.alpha": torch.tensor(float(RANK))}
    return out


def write(path: Path, state: dict[str, torch.Tensor]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_DIR for these tests: local LoRA files placed here may be named by path."""
    root = tmp_path_factory.mktemp("loras")
    wan = wan_lora(1)
    write(root / "wan-peft.safetensors", as_peft(wan, "transformer."))
    write(root / "wan-peft-noprefix.safetensors", as_peft(wan, ""))  # diffusers' save_lora_adapter layout
    write(root / "wan-peft-saved.safetensors", as_peft(wan, "base_model.model."))  # PEFT's save_pretrained
    write(root / "wan-lightx2v.safetensors", as_wan_original(wan))
    write(root / "wan-musubi.safetensors", as_musubi(wan))
    write(root / "wan-t2v.safetensors", as_wan_original(wan_lora(1, i2v=False)))
    write(root / "wan-peft-t2v.safetensors", as_peft(wan_lora(1, i2v=False), "transformer."))
    write(root / "wan-other.safetensors", as_peft(wan_lora(2), "transformer."))
    write(root / "wan-distill.safetensors", as_wan_original(wan_lora(3)))
    sdxl = sdxl_lora(4)
    write(root / "sdxl-peft.safetensors", as_peft(sdxl, "unet."))
    write(root / "sdxl-kohya-unet.safetensors", as_kohya(sdxl, text_encoders=False))
    write(root / "sdxl-kohya.safetensors", as_kohya(sdxl, text_encoders=True, seed=5))
    return root


@pytest.fixture(scope="module")
def lora_env(tiny_env: dict[str, str], lora_dir: Path) -> dict[str, str]:
    return {**tiny_env, "MODEL_DIR": str(lora_dir), "LORA_CACHE_DIR": str(lora_dir / "cache")}


@pytest.fixture()
def models(tiny_models, lora_env) -> Iterator[ModelHandler]:
    """The worker's ModelHandler (shared with the other tests) under LoRA-enabled settings.

    Afterwards every pipeline is switched back to no LoRA (by a job without LoRAs) and the
    settings are restored: later tests (test_worker's parity with plain diffusers) then run on
    pipelines that have held LoRAs, as a real worker does.
    """
    original = tiny_models.settings
    use(tiny_models, lora_env)
    try:
        yield tiny_models
    finally:
        use(tiny_models, lora_env)
        if tiny_models.wan.loras is not None:
            video(tiny_models)
        if tiny_models.sdxl.loras is not None:
            image(tiny_models)
        _set_settings(tiny_models, original)


@pytest.fixture()
def run_job(models):
    """Jobs through a Worker on the shared models, under the settings `use` last set."""
    def run(job_input: dict, job_id: str = "test-job") -> dict:
        return Worker(models.settings, models).run({"id": job_id, "input": job_input})

    return run


def _set_settings(models: ModelHandler, settings: Settings) -> None:
    for holder in (models, models.sdxl, models.wan):
        holder.settings = settings


def use(models: ModelHandler, env: dict[str, str]) -> None:
    """Switch the settings read per job (LoRA cache and size cap, fusing, WAN_FAST_LORA); the loaded
    pipelines and the adapters in them stay, as the old in-process reconfiguration kept them."""
    _set_settings(models, load_settings(env))


def video(models: ModelHandler, **fields) -> np.ndarray:
    """The uint8 frames of a tiny video job as the worker hands them to the MP4 encoder (no lossy H.264 round
    trip), as int16: differences are in levels of 255, and "the same" allows one (two float computations that
    agree can still round apart), so "changed" means more than one."""
    job = validate_input({**VIDEO, **fields}, models.settings)
    wan, _ = models.model("video")
    frames, _ = wan.generate(job, png_image(64, 64), lambda *_: None)
    assert frames.dtype == np.uint8
    return frames.astype(np.int16)


@contextmanager
def unet_outputs(models: ModelHandler) -> Iterator[list[torch.Tensor]]:
    """Record the SDXL base UNet's outputs (exact float tensors, before any uint8 rounding)."""
    seen: list[torch.Tensor] = []
    hook = models.sdxl.base.unet.register_forward_hook(lambda m, args, out: seen.append(out[0].detach().clone()))
    try:
        yield seen
    finally:
        hook.remove()


def image(models: ModelHandler, **fields) -> tuple[np.ndarray, torch.Tensor]:
    """A tiny image job: the PNG's pixels and the base UNet's outputs of every step."""
    job = validate_input({**IMAGE, **fields}, models.settings)
    sdxl, _ = models.model("image")
    with unet_outputs(models) as seen:
        images, _ = sdxl.generate(job, None, lambda *_: None)
    return np.asarray(images[0]), torch.stack(seen)


def entry(lora_dir: Path, name: str, scale: float = 1.0) -> dict:
    return {"path": str(lora_dir / name), "scale": scale}


@pytest.fixture(scope="module")
def pristine(lora_env) -> ModelHandler:
    """A second ModelHandler (a fresh worker process): the baselines come from it before any LoRA."""
    return ModelHandler(decide(load_settings(lora_env)))


@pytest.fixture(scope="module")
def baseline_video(pristine) -> np.ndarray:
    """The tiny video on a ModelHandler that never loaded a LoRA."""
    assert pristine.wan.loras is None and pristine.sdxl.loras is None
    return video(pristine)


@pytest.fixture(scope="module")
def baseline_image(pristine) -> tuple[np.ndarray, torch.Tensor]:
    assert pristine.sdxl.loras is None
    return image(pristine)


# ------------------------------------------------------------------------- the request
def test_loras_field_is_validated_entry_by_entry():
    ok = validate_input({"prompt": "x", "loras": [{"path": "me/style"}, {"path": "https://h/a", "scale": -0.5}]})
    assert [(s.label, s.kind, s.location, s.filename, s.scale) for s in ok.loras] == [
        ("Field 'loras[0].path'", "hub", "me/style", "pytorch_lora_weights.safetensors", 1.0),
        ("Field 'loras[1].path'", "url", "https://h/a", None, -0.5)]
    assert validate_input({"prompt": "x"}).loras == ()
    bad = [
        ("a/b", "Field 'loras' must be a list of at most 4 objects: path (a string of at most 2,048 characters, "
                "required); scale (a number from -4 to 4, default 1); weight_name (a string of at most 512 "
                "characters), got string 'a/b'."),
        ([{"path": "a/b", "scale": 5}], "Field 'loras[0].scale' must be a number from -4 to 4, got number 5.0."),
        ([{"path": "a/b"}, {"path": "c/d", "scale": "1"}],
         "Field 'loras[1].scale' must be a number from -4 to 4, got string '1'."),
        ([{"path": "a/b"}] * 5, "Field 'loras' holds 5 entries; at most 4 are allowed."),
        (["a/b"], "Field 'loras[0]' must be an object with path, scale, weight_name, got string 'a/b'."),
        ([None], "Field 'loras[0]' must be an object with path, scale, weight_name, got null."),
        ([{"path": " "}], "Field 'loras[0].path' must be an http(s) URL, a Hugging Face repo id ('owner/name', "
                          "optionally followed by '/file.safetensors') or an absolute path of a .safetensors file, "
                          "got ' '."),
        ([{"scale": 1}], "Field 'loras[0].path' is required and must be a string of at most 2,048 characters."),
        ([{"path": "a/b", "strength": 1}],
         "Field 'loras[0]' has the unknown key 'strength'; allowed keys are: path, scale, weight_name."),
    ]
    for value, message in bad:
        with pytest.raises(InputError) as err:
            validate_input({"mode": "video", "prompt": "x", "image_url": "y", "loras": value})
        assert str(err.value) == message


def test_loras_need_the_base_model_so_img2img_refuses_them():
    with pytest.raises(InputError, match=r"^Field 'loras' applies to the SDXL base model, which does not run when "
                                         r"image_url is given"):
        validate_input({"prompt": "x", "image_url": "y", "loras": [{"path": "a/b"}]})


def test_fast_preset_changes_defaults_only():
    with_fast_lora = load_settings({"WAN_FAST_LORA": "lightx2v/Wan2.1-Distill-Loras/a.safetensors"})
    defaults = {**VIDEO, "num_inference_steps": None, "guidance_scale": None}
    fast = validate_input({**defaults, "preset": "fast"}, with_fast_lora)
    assert (fast.num_inference_steps, fast.guidance_scale, fast.flow_shift) == (4, 1.0, 5.0)
    assert [(s.label, s.location, s.filename, s.scale) for s in fast.loras] == [
        ("WAN_FAST_LORA", "lightx2v/Wan2.1-Distill-Loras", "a.safetensors", 1.0)]
    given = validate_input({**defaults, "preset": "fast", "num_inference_steps": 6, "guidance_scale": 3.0},
                           with_fast_lora)
    assert (given.num_inference_steps, given.guidance_scale, given.flow_shift) == (6, 3.0, 5.0)
    quality = validate_input(defaults, with_fast_lora)
    assert (quality.preset, quality.num_inference_steps, quality.guidance_scale, quality.flow_shift) == (
        "quality", 40, 5.0, 3.0)
    assert quality.loras == ()
    with pytest.raises(InputError, match=r"^Field 'preset' must be one of 'quality', 'fast', got string 'turbo'\.$"):
        validate_input({**VIDEO, "preset": "turbo"})
    with pytest.raises(InputError, match="'preset' is not accepted in mode 'image'"):
        validate_input({"prompt": "x", "preset": "fast"})


@pytest.mark.parametrize(("path", "weight_name", "kind", "location", "filename"), [
    ("https://example.com/x.safetensors?sig=1", None, "url", "https://example.com/x.safetensors?sig=1", None),
    ("lightx2v/Wan2.1-Distill-Loras", None, "hub", "lightx2v/Wan2.1-Distill-Loras", "pytorch_lora_weights.safetensors"),
    ("me/style", "sub/style.safetensors", "hub", "me/style", "sub/style.safetensors"),
    ("Kijai/WanVideo_comfy/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", None, "hub",
     "Kijai/WanVideo_comfy", "Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"),
])
def test_lora_paths_are_urls_hub_files_or_local_files(path, weight_name, kind, location, filename):
    spec = parse_source(path, "Field 'loras[0].path'", ["/models"], weight_name)
    assert (spec.kind, spec.location, spec.filename) == (kind, location, filename)
    assert spec.adapter_name.startswith("lora_") and len(spec.key) == 64


@pytest.mark.parametrize(("path", "weight_name", "message"), [
    ("/etc/passwd.safetensors", None, "Field 'loras[0].path' is the local path '/etc/passwd.safetensors', which lies "
                                      "outside the folders LoRAs may be read from"),
    ("/models/../etc/x.safetensors", None, "which lies outside the folders LoRAs may be read from"),
    ("/models/style.ckpt", None, "Field 'loras[0].path' must name a .safetensors file, got '/models/style.ckpt'; "
                                 "pickled .ckpt/.pt/.bin files are not loaded."),
    ("me/style/../../x.safetensors", None, "must name a .safetensors file inside the repo 'me/style'"),
    ("me/style/a.safetensors", "b.safetensors", "names the file 'a.safetensors' inside the repo and weight_name"),
    ("https://example.com/a", "b.safetensors", "is a URL, 'https://example.com/a', so weight_name"),
    ("style.safetensors", None, "Field 'loras[0].path' must be an http(s) URL, a Hugging Face repo id"),
    ("loras/style.safetensors", None, "Field 'loras[0].path' looks like a relative file path, "
                                      "'loras/style.safetensors'; a local LoRA needs an absolute path"),
    ("ftp://example.com/a.safetensors", None, "must be an http(s) URL, a Hugging Face repo id"),
])
def test_bad_lora_paths_are_refused_before_any_work(path, weight_name, message):
    with pytest.raises(InputError) as err:
        parse_source(path, "Field 'loras[0].path'", ["/models"], weight_name)
    assert message in str(err.value)


def test_lora_settings(tmp_path):
    s = load_settings({"MODEL_DIR": str(tmp_path), "LORA_CACHE_DIR": str(tmp_path / "c"), "LORA_CACHE_GB": "0.5",
                       "LORA_FUSE": "1", "WAN_FAST_LORA": "lightx2v/Wan2.1-Distill-Loras/a.safetensors"})
    assert (s.lora_cache_dir, s.lora_cache_bytes, s.lora_fuse) == (str(tmp_path / "c"), 512 * 1024**2, True)
    assert str(tmp_path) in s.lora_roots and "/runpod-volume" in s.lora_roots
    assert s.wan_fast_lora == "lightx2v/Wan2.1-Distill-Loras/a.safetensors"
    assert load_settings({}).lora_fuse is False and load_settings({}).wan_fast_lora is None
    with pytest.raises(SettingsError, match=r"^WAN_FAST_LORA must be an http\(s\) URL, a Hugging Face repo id"):
        decide(load_settings({"WAN_FAST_LORA": "distill.safetensors"}))
    with pytest.raises(SettingsError, match="LORA_CACHE_GB must be a positive number of GB"):
        load_settings({"LORA_CACHE_GB": "0"})


# ------------------------------------------------------------------------- Wan formats
def test_every_wan_lora_format_loads_and_gives_the_same_video(models, lora_dir, baseline_video):
    peft = video(models, loras=[entry(lora_dir, "wan-peft.safetensors")])
    assert np.abs(peft - baseline_video).max() > 1, "the LoRA did not change the video"
    for name in ("wan-peft-noprefix.safetensors", "wan-peft-saved.safetensors", "wan-lightx2v.safetensors",
                 "wan-musubi.safetensors"):
        other = video(models, loras=[entry(lora_dir, name)])
        np.testing.assert_allclose(other, peft, atol=1, err_msg=name)
    # A T2V LoRA on the I2V model: diffusers pads the image K/V projections with zeros.
    t2v = video(models, loras=[entry(lora_dir, "wan-t2v.safetensors")])
    np.testing.assert_allclose(t2v, video(models, loras=[entry(lora_dir, "wan-peft-t2v.safetensors")]), atol=1)
    assert np.abs(t2v - baseline_video).max() > 1 and np.abs(t2v - peft).max() > 1
    half = video(models, loras=[entry(lora_dir, "wan-peft.safetensors", 0.5)])
    assert np.abs(half - peft).max() > 1, "the scale was ignored"
    # 7 LoRAs were loaded; the least recently used beyond KEEP_LOADED were deleted from the model.
    state = models.wan.loras
    assert len(state.loaded) == loras.KEEP_LOADED == len(models.wan.pipe.transformer.peft_config)
    assert set(state.loaded) == set(models.wan.pipe.transformer.peft_config)
    # No LoRA: the kept adapters are disabled, and the video is the never-touched one, bit for bit.
    assert np.array_equal(video(models), baseline_video)


def test_sequential_jobs_with_different_loras_do_not_leak(models, lora_dir, baseline_video):
    other = [entry(lora_dir, "wan-other.safetensors")]
    first = video(models, loras=other)
    video(models, loras=[entry(lora_dir, "wan-peft.safetensors")])
    both = video(models, loras=[entry(lora_dir, "wan-peft.safetensors"), *other])
    assert np.abs(both - first).max() > 1
    assert np.array_equal(video(models, loras=other), first)
    assert np.array_equal(video(models), baseline_video)


def test_the_same_lora_set_as_the_previous_job_is_not_reloaded(models, lora_dir, monkeypatch):
    job = [entry(lora_dir, "wan-other.safetensors", 0.7)]
    video(models, loras=job)
    state = models.wan.loras
    calls = []
    for name in ("load_lora_weights", "set_adapters", "disable_lora", "delete_adapters"):
        monkeypatch.setattr(state.pipe, name, lambda *a, _n=name, **k: calls.append(_n))
    p = validate_input({**VIDEO, "loras": job}, models.settings)
    _, timings = models.wan.generate(p, png_image(64, 64), lambda *_: None)
    assert calls == [] and timings["lora_s"] < 0.01
    monkeypatch.undo()
    loads = state.loads
    video(models, loras=[{**job[0], "scale": 0.3}])  # another scale: set_adapters, but no reload
    assert state.loads == loads


# ------------------------------------------------------------------------- fusing
def test_fused_equals_unfused_and_is_undone_bit_for_bit(models, lora_env, lora_dir, baseline_video):
    job = [entry(lora_dir, "wan-lightx2v.safetensors"), entry(lora_dir, "wan-other.safetensors", -0.5)]
    unfused = video(models, loras=job)
    use(models, {**lora_env, "LORA_FUSE": "1"})
    transformer = models.wan.pipe.transformer
    def weights() -> dict[str, torch.Tensor]:  # fusing unloads the adapters: names without their base_layer
        return {n.replace(".base_layer", ""): p for n, p in transformer.named_parameters() if "lora_" not in n}

    before = {n: p.detach().clone() for n, p in weights().items()}
    fused = video(models, loras=job)
    assert models.wan.loras.fused
    np.testing.assert_allclose(fused, unfused, atol=1)
    assert np.array_equal(video(models, loras=job), fused)  # same set: stays fused, same result
    assert np.array_equal(video(models), baseline_video)  # restored from the CPU copies, not by subtraction
    assert weights().keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in weights().items())
    fused_other = video(models, loras=job[1:])  # another set: restore, then fuse the new one
    use(models, lora_env)
    np.testing.assert_allclose(fused_other, video(models, loras=job[1:]), atol=1)
    assert not models.wan.loras.fused
    assert np.array_equal(video(models), baseline_video)


def test_a_fused_wan_lora_runs_the_blocks_compiled_at_start_up(models, lora_env, lora_dir, make_worker):
    """WAN_COMPILE=1 with LORA_FUSE=1: the fast preset's LoRA, fused, runs the blocks the start-up warm-up
    compiled (dynamo's fail_on_recompile stance would raise) and gives the eager, unfused fast video; the
    quality job after it gives the quality video of before it, bit for bit."""
    import torch._dynamo.utils as dynamo_utils
    from media import probe_mp4

    distill = str(lora_dir / "wan-distill.safetensors")
    use(models, {**lora_env, "WAN_FAST_LORA": distill})
    eager_fast = video(models, preset="fast", num_inference_steps=None)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    worker = make_worker({**lora_env, "WAN_FAST_LORA": distill, "LORA_FUSE": "1", "WAN_COMPILE": "1",
                          "COMPILE_CACHE_DIR": "off"}, new_models=True)
    try:
        assert set(worker.models.start_up()) == {"wan_load_s", "wan_warm_up_s"}
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        worker.models.wan.stance = "fail_on_recompile"
        quality = video(worker.models)
        fast = [video(worker.models, preset="fast", num_inference_steps=None) for _ in range(2)]
        assert worker.models.wan.loras.fused
        again = video(worker.models)
        served = worker.run({"id": "fast", "input": {**VIDEO, "image_url": png_b64(64, 48), "preset": "fast"}})
        assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled during the jobs
    finally:
        torch._dynamo.reset()
    assert np.array_equal(again, quality)
    assert np.array_equal(fast[1], fast[0])
    print(f"fused compiled fast preset against unfused eager: max abs {np.abs(fast[0] - eager_fast).max():.2e}")
    assert np.abs(fast[0] - eager_fast).max() <= 1  # inductor's fused float32 kernels round differently
    assert np.abs(fast[0] - quality).max() > 12  # and the LoRA did change the video
    assert probe_mp4(decode_data_uri(served["video"], "video/mp4"))["frames"] == VIDEO["num_frames"]


def _dequantized(layer) -> torch.Tensor:
    return layer.weight.float() * layer.weight_scale


def test_loras_fuse_into_quantized_wan_weights_and_are_undone_bit_for_bit(lora_env, lora_dir, make_worker,
                                                                           monkeypatch, baseline_video):
    """WAN_FP8=1 with LORA_FUSE=1: two LoRAs at small scales fuse into the float8 weights, quantized from the
    stored weights (a dequantized weight lies on the float8 grid, where a small change rounds back to nothing),
    into the same tensors; the next job without LoRAs gives the video of before, bit for bit. The plan turns
    WAN_FP8 off without an Ada or Hopper GPU; here it is let through, and the same float8 layers run on the
    CPU (torch._scaled_mm has a CPU kernel), through the same loading and fusing code."""
    import plan
    from models.float8 import Float8Linear

    monkeypatch.setattr(plan, "_fp8_unusable", lambda *args: None)
    worker = make_worker({**lora_env, "WAN_FP8": "1"}, new_models=True)
    m = worker.models
    job = [entry(lora_dir, "wan-other.safetensors", 0.002), entry(lora_dir, "wan-lightx2v.safetensors", -0.002)]
    plain = video(m)
    unfused = video(m, loras=job)
    # Each adapted layer: its float8 layer, its values and the LoRAs' summed change, while still unfused.
    layers = [(layer.get_base_layer(), _dequantized(layer.get_base_layer()),
               sum(layer.get_delta_weight(name) for name, _ in m.wan.loras.active).detach())
              for layer in loras._tuner_layers([m.wan.pipe.transformer])]
    assert layers and all(isinstance(base, Float8Linear) for base, _, _ in layers)
    pointers = [(base.weight.data_ptr(), base.weight_scale.data_ptr()) for base, _, _ in layers]
    use(m, {**lora_env, "WAN_FP8": "1", "LORA_FUSE": "1"})
    fused = video(m, loras=job)
    assert m.wan.loras.fused
    weights = {id(p) for p in m.wan.pipe.transformer.parameters()}
    assert all(id(base.weight) in weights for base, _, _ in layers)  # the tensors compiled code has seen
    assert [(base.weight.data_ptr(), base.weight_scale.data_ptr()) for base, _, _ in layers] == pointers
    # How much of the LoRAs' change the fused weights carry: their change projected on it.
    delta = torch.cat([d.flatten() for _, _, d in layers])
    change = torch.cat([(_dequantized(base) - before).flatten() for base, before, _ in layers])
    kept = float(change @ delta / (delta @ delta))
    rms = float(delta.norm() / torch.cat([b.flatten() for _, b, _ in layers]).norm())
    error, lora_change = np.abs(fused - unfused).mean(), np.abs(unfused - plain).mean()
    float8_change = np.abs(plain - baseline_video).mean()  # what float8 itself does to the video
    print(f"float8 fuse keeps {kept:.2f} of the LoRAs' change (its size {rms:.2%} of the weights'); video: fused "
          f"against unfused {error:.2e}, the LoRAs' change {lora_change:.2e}, float8's {float8_change:.2e}")
    assert 0.8 < kept < 1.2  # from the dequantized weights: 0.29 here
    # Fused, the LoRAs' change (0.77% of the weights) is rounded with the weights to float8 (steps of ~6%) and
    # goes through float8 activations; unfused it is added beside them in full precision. The tiny random model
    # carries that rounding through the steps: the video moves, by less than float8 itself moves it.
    assert error < float8_change
    assert np.array_equal(video(m), plain)


# ------------------------------------------------------------------------- SDXL
def test_sdxl_loras_in_peft_and_kohya_format(models, lora_dir, baseline_image):
    base_png, base_unet = baseline_image
    png, unet = image(models, loras=[entry(lora_dir, "sdxl-peft.safetensors")])
    assert (unet - base_unet).abs().max() > 1e-3 and np.abs(png.astype(int) - base_png).max() > 0
    _, kohya_unet = image(models, loras=[entry(lora_dir, "sdxl-kohya-unet.safetensors")])
    torch.testing.assert_close(kohya_unet, unet, atol=1e-5, rtol=1e-5)
    # kohya with both text encoders: they change the prompt embeddings too.
    _, te_unet = image(models, loras=[entry(lora_dir, "sdxl-kohya.safetensors")])
    assert (te_unet - unet).abs().max() > 1e-4
    assert {"unet", "text_encoder", "text_encoder_2"} <= set(models.sdxl.base.get_list_adapters())
    no_png, no_unet = image(models)
    assert torch.equal(no_unet, base_unet) and np.array_equal(no_png, base_png)


def test_the_refiner_sees_the_shared_text_encoder_without_loras(models, lora_dir):
    seen = []
    sdxl, _ = models.model("image")
    te2 = sdxl.refiner.text_encoder_2
    hook = sdxl.refiner.unet.register_forward_pre_hook(
        lambda m, args: seen.append(all(layer.disable_adapters for layer in loras._tuner_layers([te2]))))
    try:
        image(models, loras=[entry(lora_dir, "sdxl-kohya.safetensors")])
    finally:
        hook.remove()
    assert seen and all(seen)
    assert not any(layer.disable_adapters for layer in loras._tuner_layers([te2]))  # back on for the base


def test_fused_sdxl_lora_is_undone_bit_for_bit(models, lora_env, lora_dir, baseline_image):
    job = [entry(lora_dir, "sdxl-kohya.safetensors")]
    _, unfused = image(models, loras=job)
    use(models, {**lora_env, "LORA_FUSE": "1"})
    _, fused = image(models, loras=job)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    png, unet = image(models)
    use(models, lora_env)
    assert torch.equal(unet, baseline_image[1]) and np.array_equal(png, baseline_image[0])


# ------------------------------------------------------------------------- bad files
def _bad_files(lora_dir: Path) -> dict[str, tuple[str, str]]:
    good = (lora_dir / "wan-peft.safetensors").read_bytes()
    wrong = as_peft(wan_lora(6), "transformer.")
    wrong["transformer.blocks.0.ffn.net.0.proj.lora_A.weight"] = torch.randn(RANK, 40)
    partial = as_peft({"blocks.0.attn1.to_q": wan_lora(7)["blocks.0.attn1.to_q"],
                       "blocks.7.attn1.to_q": wan_lora(7)["blocks.0.attn1.to_q"]}, "transformer.")
    files = {
        "wrong-shape": (write(lora_dir / "bad" / "wrong-shape.safetensors", wrong),
                        "does not fit the Wan2.1 I2V transformer: its weights for blocks.0.ffn.net.0.proj have shape "
                        "[4, 40] where the model needs [4, 24]; use a LoRA made for this model."),
        "partial": (write(lora_dir / "bad" / "partial.safetensors", partial),
                    "does not fit the Wan2.1 I2V transformer: only 1 of its 2 LoRA layers match a layer of the model"),
        "sdxl-on-wan": (str(lora_dir / "sdxl-peft.safetensors"),
                        "does not fit the Wan2.1 I2V transformer: none of its 32 LoRA layers match a layer"),
        "kohya-on-wan": (str(lora_dir / "sdxl-kohya-unet.safetensors"), "does not fit the Wan2.1 I2V transformer: "),
        "no-lora-keys": (write(lora_dir / "bad" / "plain.safetensors", {"blocks.0.attn1.to_q.weight": torch.ones(2)}),
                         "holds no LoRA weights (no lora_A/lora_down tensors among its 1 keys"),
    }
    (lora_dir / "bad" / "image.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    files["not-safetensors"] = (str(lora_dir / "bad" / "image.safetensors"), "is not a .safetensors file (308 bytes; "
                                "safetensors: header too large); LoRAs must be complete .safetensors files.")
    (lora_dir / "bad" / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    files["truncated"] = (str(lora_dir / "bad" / "truncated.safetensors"), "is a truncated .safetensors file (")
    files["missing"] = (str(lora_dir / "bad" / "missing.safetensors"), "does not exist (or is not a file).")
    return files


def test_bad_lora_files_are_clear_errors_and_leave_no_trace(run_job, models, lora_dir, baseline_video):
    files = _bad_files(lora_dir)
    for case, (path, message) in files.items():
        result = run_job({**VIDEO, "image_url": "data:image/png;base64," + _png64(),
                          "loras": [{"path": path}]})
        assert set(result) == {"error"}, (case, result)
        assert result["error"].startswith(f"Field 'loras[0].path' names the LoRA {path!r}, which "), (case, result)
        assert message in result["error"], (case, result)
    # A Wan LoRA on SDXL matches nothing there either.
    result = run_job({**IMAGE, "loras": [{"path": str(lora_dir / "wan-lightx2v.safetensors")}]})
    assert ("does not fit the SDXL base model: its keys are not in a LoRA format this model reads (for example "
            "'diffusion_model.blocks.0.") in result["error"], result
    assert not any(name in models.wan.loras.loaded for name in _adapter_names(files))
    assert np.array_equal(video(models), baseline_video)


def _adapter_names(files: dict) -> set[str]:
    return {parse_source(path, "x", ["/"]).adapter_name for path, _ in files.values()}


def _png64() -> str:
    return png_b64(64, 64)


# ------------------------------------------------------------------------- downloads
def test_a_lora_url_is_downloaded_once_then_served_from_the_disk_cache(run_job, models, lora_env, lora_dir,
                                                                      httpserver, monkeypatch, pristine,
                                                                      baseline_video):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    data = (lora_dir / "wan-musubi.safetensors").read_bytes()
    httpserver.expect_request("/loras/style").respond_with_data(data, content_type="application/octet-stream")
    url = httpserver.url_for("/loras/style")
    job = {**VIDEO, "image_url": "data:image/png;base64," + _png64(), "loras": [{"path": url, "scale": 0.8}]}
    first = run_job(job)
    assert "error" not in first, first
    assert set(first["timings"]) == {"fetch_s", "load_s", "inference_s", "encode_s", "lora_s"}
    key = hashlib.sha256(f"url\n{url}\nNone".encode()).hexdigest()  # sha256 of the source
    cached = Path(lora_env["LORA_CACHE_DIR"]) / f"{key}.safetensors"
    assert cached.read_bytes() == data and len(httpserver.log) == 1
    assert run_job(job)["video"] == first["video"] and len(httpserver.log) == 1
    # Another worker process (its own ModelHandler) loads the file from the disk cache, not the server.
    loads = pristine.wan.loras.loads if pristine.wan.loras is not None else 0
    video(pristine, loras=job["loras"])
    assert len(httpserver.log) == 1 and pristine.wan.loras.loads == loads + 1


def test_lora_downloads_are_refused_when_broken_too_large_or_private(run_job, models, lora_env, httpserver,
                                                                    monkeypatch, lora_dir):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    httpserver.expect_request("/missing").respond_with_data("no", status=404)
    httpserver.expect_request("/junk").respond_with_data(b"<html>login</html>")
    httpserver.expect_request("/big").respond_with_data((lora_dir / "wan-peft.safetensors").read_bytes())
    base = {**VIDEO, "image_url": "data:image/png;base64," + _png64()}
    cases = {
        "/missing": "answered HTTP 404; the file must be served with status 200.",
        "/junk": "is not a .safetensors file (18 bytes; safetensors: header too large)",
    }
    for path, message in cases.items():
        result = run_job({**base, "loras": [{"path": httpserver.url_for(path)}]})
        assert result["error"].startswith(f"Field 'loras[0].path' names the LoRA '{httpserver.url_for(path)}', which")
        assert message in result["error"], result
    use(models, {**lora_env, "LORA_MAX_GB": str(2000 / 1024**3)})
    result = run_job({**base, "loras": [{"path": httpserver.url_for("/big")}]})
    assert "bytes; at most 2,000 are accepted (LORA_MAX_GB)." in result["error"], result
    use(models, lora_env)
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS")
    result = run_job({**base, "loras": [{"path": httpserver.url_for("/big")}]})
    assert re.search(r"resolves to the non-public address \S+; only public http\(s\) addresses are allowed \(a file "
                     r"on the network volume can be given as a local path\)\.$", result["error"]), result
    assert not list(Path(lora_env["LORA_CACHE_DIR"]).glob("*.part"))  # nothing half-written is left


@pytest.mark.parametrize("fault", ["read-only", "under-a-file", "full"])
def test_a_lora_cache_that_cannot_take_the_file_names_lora_cache_dir_and_the_next_job_succeeds(
        run_job, models, lora_env, lora_dir, httpserver, monkeypatch, tmpfs, tmp_path, fault):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    data = (lora_dir / "wan-musubi.safetensors").read_bytes()  # ~20 KB
    httpserver.expect_request(f"/loras/{fault}").respond_with_data(data, content_type="application/octet-stream")
    url = httpserver.url_for(f"/loras/{fault}")
    if fault == "under-a-file":
        (tmp_path / "a-file").write_bytes(b"")
        cache = tmp_path / "a-file" / "cache"
        why = (f"LORA_CACHE_DIR='{cache}' is not a folder ({tmp_path}/a-file is a file); set LORA_CACHE_DIR to a "
               f"folder.")
    elif fault == "read-only":
        cache = tmpfs(read_only=True)
        why = (f"LORA_CACHE_DIR='{cache}' is not writable (Read-only file system); set LORA_CACHE_DIR to a folder "
               f"this worker can write.")
    else:
        cache = tmpfs("8k")
        why = (rf"the disk holding LORA_CACHE_DIR='{cache}' is full \([\d.]+ MB free\); free space there or set "
               rf"LORA_CACHE_DIR to a folder on a larger disk\.")
    use(models, {**lora_env, "LORA_CACHE_DIR": str(cache)})
    job = {**VIDEO, "image_url": "data:image/png;base64," + _png64(), "loras": [{"path": url}]}
    result = run_job(job)
    assert list(result) == ["error"], result
    start = f"Field 'loras[0].path' names the LoRA '{url}', which cannot be downloaded into the LoRA cache: "
    if fault == "full":
        assert re.fullmatch(re.escape(start) + why, result["error"]), result
        assert os.listdir(cache) == []  # no partial file left
    else:
        assert result["error"] == start + why
    use(models, lora_env)
    assert "video" in run_job(job)  # the same job, with a cache that works


def test_the_disk_cache_evicts_least_recently_used_files(tmp_path):
    cache = loras.LoraCache(tmp_path, max_bytes=2500)
    specs = [parse_source(f"https://example.com/{i}", "x", []) for i in range(4)]
    for age, spec in enumerate(specs[:3]):
        cache.path_for(spec).write_bytes(b"\0" * 1000)
        os.utime(cache.path_for(spec), (1_000_000 + age, 1_000_000 + age))
    assert cache.fetch(specs[0], max_bytes=10**6, timeout_s=1) == cache.path_for(specs[0])  # a use refreshes it
    cache.path_for(specs[3]).write_bytes(b"\0" * 1000)
    cache.evict(keep=cache.path_for(specs[3]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cache.path_for(s).name for s in (specs[0], specs[3]))


# ------------------------------------------------------------------------- fast preset
@contextmanager
def transformer_calls(models: ModelHandler) -> Iterator[list[int]]:
    """Count forward calls of the real Wan transformer (the module the pipeline calls each step)."""
    calls: list[int] = []
    wan, _ = models.model("video")
    hook = wan.pipe.transformer.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def test_fast_preset_runs_four_steps_with_one_transformer_call_each(run_job, models, lora_env, lora_dir,
                                                                    baseline_video):
    distill = str(lora_dir / "wan-distill.safetensors")
    use(models, {**lora_env, "WAN_FAST_LORA": distill})
    progress = []
    p = validate_input({**VIDEO, "num_inference_steps": None, "preset": "fast"}, models.settings)
    with transformer_calls(models) as calls:
        frames, timings = models.wan.generate(p, png_image(64, 64), lambda *a: progress.append(a))
    assert len(calls) == 4 and progress[-1] == ("denoise", 4, 4)
    assert models.wan.pipe.scheduler.config.flow_shift == 5.0 and "lora_s" in timings
    fast_spec = parse_source(distill, "WAN_FAST_LORA", ["/"])
    assert models.wan.loras.active == ((fast_spec.adapter_name, 1.0),)
    # Explicit fields win: 3 steps with CFG are 6 calls; the request's own LoRA stacks on the fast one.
    with transformer_calls(models) as calls:
        video(models, preset="fast", num_inference_steps=3, guidance_scale=2.0,
              loras=[entry(lora_dir, "wan-other.safetensors", 0.5)])
    assert len(calls) == 6 and len(models.wan.loras.active) == 2
    # The request may list the fast LoRA itself to set its scale; it is not added twice.
    video(models, preset="fast", loras=[{"path": distill, "scale": 0.5}])
    assert models.wan.loras.active == ((fast_spec.adapter_name, 0.5),)
    # Back to quality: no LoRA, the defaults, the original video.
    assert np.array_equal(video(models), baseline_video)


def test_fast_preset_without_a_configured_lora(run_job, models, lora_env, lora_dir):
    job = {**VIDEO, "image_url": "data:image/png;base64," + _png64(), "preset": "fast"}
    assert run_job(job) == {"error": "Field 'preset' is 'fast', which needs a step-distilled LoRA, but this worker "
                                     "has no WAN_FAST_LORA configured; send one in 'loras' (for example lightx2v's "
                                     "Wan2.1 I2V 480P StepDistill-CfgDistill LoRA) or ask for preset 'quality'."}
    with transformer_calls(models) as calls:
        result = run_job({**job, "num_inference_steps": None, "loras": [entry(lora_dir, "wan-distill.safetensors")]})
    assert "error" not in result, result
    assert len(calls) == 4
