"""Speed switches that run on CPU: Wan's VAE in bf16, the x264 preset, SDXL whole-UNet compilation
with its start-up warm-up, and the bf16 compaction of downloaded Wan weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import decode_data_uri, png_b64
from test_worker import IMAGE, VIDEO, pngs

import download_weights
import handler as worker
from settings import SettingsError, load_settings
from video_utils import probe_mp4


def _frames(result: dict) -> np.ndarray:
    assert "error" not in result, result
    return probe_mp4(decode_data_uri(result["video"], "video/mp4"))["pixels"]


def test_wan_vae_in_bf16_gives_the_same_video_within_rounding(tiny_env):
    job = {**VIDEO, "image_url": png_b64(seed=4)}
    worker.configure(load_settings(tiny_env))
    reference = _frames(worker.handler({"id": "fp32", "input": job})).astype(np.int16)
    worker.configure(load_settings(tiny_env | {"WAN_VAE_DTYPE": "bfloat16"}))
    try:
        assert worker._state()[1].load_wan() > 0  # a fresh handler: Wan loads with the setting
        assert worker._state()[1].wan.vae.dtype == torch.bfloat16
        frames = _frames(worker.handler({"id": "bf16", "input": job})).astype(np.int16)
    finally:
        worker.configure(load_settings(tiny_env))
    assert frames.shape == reference.shape == (9, 64, 96, 3)
    # bf16 keeps 8 significant bits; on the tiny random model the conditioning latents' rounding is
    # carried through denoising, so pixels move by a few levels (full size: 0.8% decode error, RESULTS.md).
    rel = np.linalg.norm(frames - reference) / np.linalg.norm(reference)
    print(f"bf16 VAE: relative error {rel:.4f}, mean abs {np.abs(frames - reference).mean():.2f} levels")
    assert 0 < rel < 0.1


@pytest.mark.parametrize(("preset", "x264_refs"), [(None, b"ref=1 "), ("medium", b"ref=3 ")])
def test_the_mp4_is_encoded_with_the_configured_x264_preset(tiny_env, preset, x264_refs):
    # x264 writes its options into the stream; 'veryfast' (the default) uses 1 reference frame, 'medium' 3.
    worker.configure(load_settings(tiny_env | ({"MP4_PRESET": preset} if preset else {})))
    try:
        result = worker.handler({"id": "mp4", "input": {**VIDEO, "image_url": png_b64()}})
    finally:
        worker.configure(load_settings(tiny_env))
    data = decode_data_uri(result["video"], "video/mp4")
    assert x264_refs in data
    assert probe_mp4(data)["frames"] == 9


@pytest.mark.parametrize(("env", "message"), [
    ({"WAN_VAE_DTYPE": "fp16"}, "WAN_VAE_DTYPE must be float32 or bfloat16, got 'fp16'."),
    ({"MP4_PRESET": "quick"}, "MP4_PRESET must be one of ultrafast, superfast, veryfast, faster, fast, medium, "
                              "slow, slower, veryslow, got 'quick'."),
])
def test_bad_speed_settings_are_refused_at_start_up(env, message):
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert str(err.value) == message


def test_sdxl_compile_warms_up_the_default_size_and_runs_other_requests_eager(tiny_env):
    """SDXL_COMPILE=1: the warm-up compiles both UNets at 1024x1024; a default-size job then gives the
    eager worker's images, and a job at another size runs eager instead of compiling again."""
    import torch._dynamo.utils as dynamo_utils

    job = {**IMAGE, "height": 1024, "width": 1024, "num_inference_steps": 5, "refiner_inference_steps": 10}
    worker.configure(load_settings(tiny_env))
    eager = np.asarray(pngs(worker.handler({"id": "eager", "input": job}))[0], dtype=np.int16)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    models = worker.configure(load_settings(tiny_env | {"SDXL_COMPILE": "1"}))
    try:
        models.prepare("image")
        models.warm_up("image")
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # base and refiner UNets
        compiled = np.asarray(pngs(worker.handler({"id": "compiled", "input": job}))[0], dtype=np.int16)
        other = worker.handler({"id": "other", "input": {**job, "height": 128, "width": 192}})
        assert [im.size for im in pngs(other)] == [(192, 128)]
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # nothing compiled during the jobs
    finally:
        worker.configure(load_settings(tiny_env))
        torch._dynamo.reset()
    assert compiled.shape == eager.shape == (1024, 1024, 3)
    assert np.abs(compiled - eager).max() <= 2  # inductor's fused float32 kernels round differently


def test_wan_compile_warms_up_its_shape_and_runs_other_shapes_eager(tiny_env):
    """WAN_COMPILE=1: the warm-up compiles the transformer blocks at its shape; a job at that shape
    gives the eager worker's video, a job at another shape runs eager instead of compiling again."""
    import torch._dynamo.utils as dynamo_utils

    job = {**VIDEO, "image_url": png_b64(seed=6)}
    worker.configure(load_settings(tiny_env))
    eager = _frames(worker.handler({"id": "eager", "input": job})).astype(np.int16)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    models = worker.configure(load_settings(tiny_env | {"WAN_COMPILE": "1"}))
    try:
        models.prepare("video")
        models.warm_up("video", height=job["height"], width=job["width"], num_frames=job["num_frames"])
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        assert graphs >= 1
        compiled = _frames(worker.handler({"id": "compiled", "input": job})).astype(np.int16)
        other = _frames(worker.handler({"id": "other", "input": {**job, "height": 64, "width": 64,
                                                                   "num_frames": 5}}))
        assert other.shape == (5, 64, 64, 3)
        assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled during the jobs
    finally:
        worker.configure(load_settings(tiny_env))
        torch._dynamo.reset()
    assert compiled.shape == eager.shape == (9, 64, 96, 3)
    assert np.abs(compiled - eager).max() <= 2  # inductor's fused float32 kernels round differently


def test_compaction_stores_wan_as_the_worker_loads_it(tiny_dir, tmp_path):
    """download_weights.compact_wan: float32 transformer and UMT5 re-saved in bf16; the weights a
    GPU worker would hold are unchanged, the files about halve, and a second run changes nothing."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    folder = tmp_path / "wan-i2v"
    shutil.copytree(tiny_dir / "wan-i2v", folder)
    before = {sub: sum(p.stat().st_size for p in (folder / sub).glob("*.safetensors"))
              for sub in ("transformer", "text_encoder")}
    assert download_weights.float32_share(folder / "transformer") == 1.0
    assert not download_weights.is_compact_wan(folder)

    assert download_weights.compact_wan(folder) == ["transformer", "text_encoder"]

    assert download_weights.is_compact_wan(folder)
    for sub, cls in (("transformer", WanTransformer3DModel), ("text_encoder", UMT5EncoderModel)):
        after = sum(p.stat().st_size for p in (folder / sub).glob("*.safetensors"))
        assert after < 0.7 * before[sub]
        on_gpu = cls.from_pretrained(str(tiny_dir / "wan-i2v" / sub), dtype=torch.bfloat16).state_dict()
        compacted = cls.from_pretrained(str(folder / sub), dtype=torch.bfloat16).state_dict()
        assert on_gpu.keys() == compacted.keys()
        for key, value in on_gpu.items():
            assert compacted[key].dtype == value.dtype and torch.equal(compacted[key], value), key
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    assert download_weights.compact_wan(folder) == []
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == mtimes


def test_the_worker_runs_a_video_from_compacted_weights(tiny_dir, tiny_env, tmp_path):
    folder = tmp_path / "wan-i2v"
    shutil.copytree(tiny_dir / "wan-i2v", folder)
    download_weights.compact_wan(folder)
    worker.configure(load_settings(tiny_env | {"WAN_MODEL_ID": str(folder)}))
    try:
        frames = _frames(worker.handler({"id": "compact", "input": {**VIDEO, "image_url": png_b64()}}))
    finally:
        worker.configure(load_settings(tiny_env))
    assert frames.shape == (9, 64, 96, 3)


def test_compact_command_refuses_a_folder_that_is_not_a_wan_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        download_weights.main(["--compact", str(tmp_path)])
    assert f"--compact '{tmp_path}' is not a Wan model folder (no model_index.json)" in capsys.readouterr().err
