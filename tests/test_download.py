"""download_weights.py: the retry wrapper around hub downloads and the --tiny layout."""

from __future__ import annotations

import json

import pytest

import download_weights


def test_a_flaky_download_is_retried_with_growing_waits(monkeypatch):
    waits, attempts = [], []
    monkeypatch.setattr(download_weights.time, "sleep", waits.append)

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("connection reset by peer")
        return "/cache/snapshot"

    assert download_weights.with_retries(flaky, "repo", tries=5, first_wait_s=2) == "/cache/snapshot"
    assert waits == [2, 4]


def test_a_download_that_keeps_failing_raises_its_last_error(monkeypatch):
    monkeypatch.setattr(download_weights.time, "sleep", lambda s: None)

    def broken() -> str:
        raise OSError("503 Service Unavailable")

    with pytest.raises(OSError, match="503"):
        download_weights.with_retries(broken, "repo", tries=3)


def test_tiny_models_mirror_the_real_repositories(tiny_dir):
    wan = json.loads((tiny_dir / "wan-i2v" / "model_index.json").read_text())
    assert wan["_class_name"] == "WanImageToVideoPipeline"
    assert {"image_encoder", "image_processor", "text_encoder", "tokenizer", "transformer", "vae"} <= set(wan)
    transformer = json.loads((tiny_dir / "wan-i2v" / "transformer" / "config.json").read_text())
    assert (transformer["image_dim"], transformer["added_kv_proj_dim"]) == (4, 24)
    scheduler = json.loads((tiny_dir / "wan-i2v" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["prediction_type"], scheduler["flow_shift"]) == (
        "UniPCMultistepScheduler", "flow_prediction", 3.0)
    vision = json.loads((tiny_dir / "wan-i2v" / "image_encoder" / "config.json").read_text())
    assert (vision["image_size"] // vision["patch_size"]) ** 2 + 1 == 257  # CLIP tokens, as ViT-H/14 at 224
    assert (tiny_dir / "sdxl-base" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (tiny_dir / "sdxl-refiner" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert json.loads((tiny_dir / "sdxl-vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
