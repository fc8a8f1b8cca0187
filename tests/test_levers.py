"""Speed switches that run on CPU: Wan's VAE in bf16, float8 self-attention (its arithmetic, emulated), the
x264 preset, SDXL whole-UNet compilation and Wan's dynamic-shape regional compilation with their start-up
warm-ups, the compile cache, and the bf16 compaction of downloaded Wan weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import decode_data_uri, png_b64, png_image
from media import probe_mp4
from test_worker import IMAGE, VIDEO, pngs

import download_weights
from models.compile_cache import CompileCache
from models.float8 import attention as float8_attention
from models.float8 import to_float8
from plan import Device, decide
from settings import SettingsError, load_settings


def _frames(result: dict) -> np.ndarray:
    assert "error" not in result, result
    return probe_mp4(decode_data_uri(result["video"], "video/mp4"))["pixels"]


def test_wan_vae_in_bf16_gives_the_same_video_within_rounding(run_job, make_worker):
    job = {**VIDEO, "image_url": png_b64(seed=4)}
    reference = _frames(run_job(job)).astype(np.int16)
    worker = make_worker({"WAN_VAE_DTYPE": "bfloat16"}, new_models=True)
    frames = _frames(worker.run({"id": "bf16", "input": job})).astype(np.int16)
    assert worker.models.wan.pipe.vae.dtype == torch.bfloat16
    assert frames.shape == reference.shape == (9, 64, 96, 3)
    # bf16 keeps 8 significant bits; on the tiny random model the conditioning latents' rounding is
    # carried through denoising, so pixels move by a few levels.
    rel = np.linalg.norm(frames - reference) / np.linalg.norm(reference)
    print(f"bf16 VAE: relative error {rel:.4f}, mean abs {np.abs(frames - reference).mean():.2f} levels")
    assert 0 < rel < 0.1


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention on (batch, tokens, heads, dim) tensors."""
    out = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2)


def test_float8_attention_error_against_exact_attention():
    """WAN_FP8_ATTENTION's arithmetic: float8 q, k, v and probabilities. On zero-mean noise (what random
    weights give) the output is itself near zero and the error about 5%; keys and values with offsets
    shared by all tokens, as trained models have, are centred before rounding and lose well under 1%."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 4, 64, generator=g) for _ in range(3))
    offset = 3 * torch.randn(1, 1, 4, 64, generator=g)  # one offset per channel, the same for every token

    def error(k: torch.Tensor, v: torch.Tensor) -> float:
        exact = _attention(q, k, v)
        return ((float8_attention(q, k, v).double() - exact).norm() / exact.norm()).item()

    noise, shifted = error(k, v), error(k + offset, v + offset)
    print(f"float8 attention: relative error {noise:.4f} on noise, {shifted:.5f} with shared offsets")
    assert 0.01 < noise < 0.08
    assert 0 < shifted < 0.005
    # Without centring, the offset would take the float8 range: the error grows past the noise case's.
    (qq, qs), (kq, ks), (vq, vs) = (to_float8(t) for t in (q, k + offset, v + offset))
    naive = _attention(*(t.float() * s[:, None, :, None] for t, s in ((qq, qs), (kq, ks), (vq, vs))))
    exact = _attention(q, k + offset, v + offset)
    assert ((naive - exact).norm() / exact.norm()).item() > 2 * shifted


def test_wan_float8_attention_changes_the_video_by_rounding_only(run_job, make_worker):
    """WAN_FP8_ATTENTION=1 on the tiny model: the blocks' self-attention runs in float8 (cross-attention does
    not), the video differs from the float32 one by rounding, and compiled it gives the eager frames."""
    job = {**VIDEO, "image_url": png_b64(seed=5)}
    reference = _frames(run_job(job)).astype(np.int16)
    worker = make_worker({"WAN_FP8_ATTENTION": "1"}, new_models=True)
    frames = _frames(worker.run({"id": "fp8-attention", "input": job})).astype(np.int16)
    blocks = worker.models.wan.pipe.transformer.blocks
    assert {b.attn1.processor._attention_backend for b in blocks} == {"_flash_3"}
    assert {b.attn2.processor._attention_backend for b in blocks} == {None}
    rel = np.linalg.norm(frames - reference) / np.linalg.norm(reference)
    print(f"float8 attention, tiny model: relative error {rel:.4f}, mean abs {np.abs(frames - reference).mean():.2f}")
    assert frames.shape == reference.shape == (9, 64, 96, 3)
    assert 0 < rel < 0.1
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = make_worker({"WAN_FP8_ATTENTION": "1", "WAN_COMPILE": "1", "COMPILE_CACHE_DIR": "off"},
                           new_models=True)
    try:
        assert set(compiled.models.start_up()) == {"wan_load_s", "wan_warm_up_s"}  # compiled, nothing failed
        assert dynamo_utils.counters["stats"]["unique_graphs"] >= 1
        compiled.models.wan.stance = "fail_on_recompile"  # the job runs the compiled float8 graph, or fails
        same = _frames(compiled.run({"id": "fp8-attention-compiled", "input": job})).astype(np.int16)
    finally:
        torch._dynamo.reset()
    print(f"compiled against eager: mean abs {np.abs(same - frames).mean():.3f} levels")
    # Inductor's fused kernels flip a float8 rounding here and there: closer to eager float8 than that is to float32.
    assert np.abs(same - frames).mean() < 0.5 * np.abs(frames - reference).mean()


def test_float8_attention_is_ignored_with_one_line_where_it_cannot_run(tiny_settings):
    def notes(settings, device=None):
        return decide(settings, device or Device()).notes

    wanted = load_settings({"WAN_FP8_ATTENTION": "1"})
    assert decide(wanted).settings.wan_fp8_attention  # emulated on CPU: the tests run it
    assert notes(load_settings({"WAN_FP8_ATTENTION": "1", "NUM_GPUS": "2"})) == (
        "WAN_FP8_ATTENTION is ignored on cpu: context parallelism (NUM_GPUS > 1) does not run it",)
    ada = Device("cuda", (8, 9), 48.0, 1)
    assert notes(wanted, ada) == ("WAN_FP8_ATTENTION is ignored on cuda: FlashAttention-3's float8 kernel needs a "
                                  "Hopper GPU (compute capability 9.0)",)
    assert not decide(wanted, ada).settings.wan_fp8_attention
    assert notes(load_settings({})) == ()


@pytest.mark.parametrize(("preset", "x264_refs"), [(None, b"ref=1 "), ("medium", b"ref=3 ")])
def test_the_mp4_is_encoded_with_the_configured_x264_preset(make_worker, preset, x264_refs):
    # x264 writes its options into the stream; 'veryfast' (the default) uses 1 reference frame, 'medium' 3.
    worker = make_worker({"MP4_PRESET": preset} if preset else {})
    data = decode_data_uri(worker.run({"id": "mp4", "input": {**VIDEO, "image_url": png_b64()}})["video"], "video/mp4")
    assert x264_refs in data
    assert probe_mp4(data)["frames"] == 9


@pytest.mark.parametrize(("env", "message"), [
    ({"WAN_VAE_DTYPE": "fp16"}, "WAN_VAE_DTYPE must be float32 or bfloat16, got 'fp16'."),
    ({"MP4_PRESET": "quick"}, "MP4_PRESET must be one of ultrafast, superfast, veryfast, faster, fast, medium, "
                              "slow, slower, veryslow, got 'quick'."),
    ({"NUM_GPUS": "0"}, "NUM_GPUS must be positive, got 0."),
    ({"RUNPOD_LOG_LEVEL": "verbose"}, "RUNPOD_LOG_LEVEL must be one of NOTSET, TRACE, DEBUG, INFO, WARN, ERROR, "
                                      "got 'verbose'."),
])
def test_bad_speed_settings_are_refused_at_start_up(env, message):
    with pytest.raises(SettingsError) as err:
        load_settings(env)
    assert str(err.value) == message


def test_sdxl_compile_warms_up_one_size_and_runs_other_requests_eager(run_job, make_worker):
    """SDXL_COMPILE=1: the start-up warm-up compiles both UNets at one size (the default 1024x1024 on a GPU,
    128x128 on CPU); a job of that size then gives the eager worker's images, and a job at another size runs
    eager instead of compiling again."""
    import torch._dynamo.utils as dynamo_utils

    job = {**IMAGE, "height": 128, "width": 128, "num_inference_steps": 5, "refiner_inference_steps": 10}
    eager = np.asarray(pngs(run_job(job))[0], dtype=np.int16)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    worker = make_worker({"SDXL_COMPILE": "1"}, new_models=True)
    try:
        assert set(worker.models.start_up()) == {"sdxl_load_s", "sdxl_warm_up_s"}
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # base and refiner UNets
        compiled = np.asarray(pngs(worker.run({"id": "compiled", "input": job}))[0], dtype=np.int16)
        other = worker.run({"id": "other", "input": {**job, "height": 128, "width": 192}})
        assert [im.size for im in pngs(other)] == [(192, 128)]
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # nothing compiled during the jobs
    finally:
        torch._dynamo.reset()
    assert compiled.shape == eager.shape == (128, 128, 3)
    assert np.abs(compiled - eager).max() <= 2  # inductor's fused float32 kernels round differently


def test_wan_compile_serves_every_shape_compiled_after_one_warm_up(tiny_models, make_worker, tmp_path):
    """WAN_COMPILE=1: the start-up warm-up compiles the transformer blocks once, with dynamic shapes; a sweep
    of other sizes, a portrait, other frame counts and an auto-sized job then run without any new compilation
    (dynamo's fail_on_recompile stance would raise) and give the eager model's frames."""
    import torch._dynamo.utils as dynamo_utils

    from jobs import size_video_job
    from schemas import validate_input
    from video_utils import cover

    image = png_image(64, 48, seed=6)
    shapes = [{"height": 64, "width": 96, "num_frames": 9}, {"height": 96, "width": 64, "num_frames": 13},
              {"height": 128, "width": 80, "num_frames": 5}, {"num_frames": 9}]  # the last: auto-sized, 4:3
    jobs = [size_video_job(validate_input({**VIDEO, "image_url": "-", "height": None, "width": None, **shape}),
                           image.size, tiny_models.settings) for shape in shapes]
    eager_wan, _ = tiny_models.model("video")
    eager = [eager_wan.generate(job, cover(image, job.width, job.height))[0] for job in jobs]
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    worker = make_worker({"WAN_COMPILE": "1", "COMPILE_CACHE_DIR": str(tmp_path)}, new_models=True)
    try:
        assert set(worker.models.start_up()) == {"wan_load_s", "wan_warm_up_s"}
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        assert graphs >= 1
        worker.models.wan.stance = "fail_on_recompile"
        compiled = [worker.models.wan.generate(job, cover(image, job.width, job.height))[0] for job in jobs]
        served = worker.run({"id": "auto", "input": {**VIDEO, "image_url": png_b64(64, 48, seed=6), "height": None,
                                                     "width": None}})  # the whole job path, compiled too
        assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled during the jobs
    finally:
        torch._dynamo.reset()
    assert (served["width"], served["height"]) == (720, 544), served
    assert [f.shape for f in compiled] == [f.shape for f in eager] == [
        (9, 64, 96, 3), (13, 96, 64, 3), (5, 128, 80, 3), (9, 544, 720, 3)]
    for c, e in zip(compiled, eager, strict=True):
        assert np.abs(c.astype(np.int16) - e).max() <= 1  # inductor's fused float32 kernels round differently


def test_the_compile_cache_is_written_whole_and_a_bad_one_costs_only_a_compile(tmp_path, caplog):
    cache = CompileCache(str(tmp_path / "volume"), "wan-key")
    assert not cache.load()  # nothing there yet: the worker compiles
    torch.compile(lambda x: x * 2 + 1)(torch.ones(3))  # something for torch to save
    assert cache.save()
    assert [p.name for p in (tmp_path / "volume").iterdir()] == ["wan-key.bin"]  # no temporary file left
    assert cache.load()
    cache.path.write_bytes(b"not artifacts")
    assert not cache.load()
    assert "could not be loaded" in caplog.text
    assert not CompileCache(None, "wan-key").load()  # no volume: no cache, no error


def test_the_compile_cache_key_changes_with_what_compiled_code_depends_on(tiny_models, make_worker):
    wan, _ = tiny_models.model("video")
    key = wan.cache_key()
    assert key == make_worker({"MP4_PRESET": "medium"}, new_models=True).models.model("video")[0].cache_key()
    assert key.startswith("wan-")
    other = wan._key(dict(wan.pipe.transformer.config, num_layers=40), False, False)
    assert key == wan._key(wan.pipe.transformer.config, False, False)
    assert other != key and other != wan._key(wan.pipe.transformer.config, True, False)
    assert key != wan._key(wan.pipe.transformer.config, True, False)  # WAN_FP8
    assert key != wan._key(wan.pipe.transformer.config, False, True)  # WAN_FP8_ATTENTION


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


def test_the_worker_runs_a_video_from_compacted_weights(tiny_dir, make_worker, tmp_path):
    folder = tmp_path / "wan-i2v"
    shutil.copytree(tiny_dir / "wan-i2v", folder)
    download_weights.compact_wan(folder)
    worker = make_worker({"WAN_MODEL_ID": str(folder)}, new_models=True)
    frames = _frames(worker.run({"id": "compact", "input": {**VIDEO, "image_url": png_b64()}}))
    assert frames.shape == (9, 64, 96, 3)


def test_compact_command_refuses_a_folder_that_is_not_a_wan_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        download_weights.main(["--compact", str(tmp_path)])
    assert f"--compact '{tmp_path}' is not a Wan model folder (no model_index.json)" in capsys.readouterr().err


def test_a_float8_switch_that_cannot_run_does_not_place_wan_as_if_it_did():
    """WAN_FP8 on a 48 GB Ampere card (no float8 matmuls): the bf16 Wan does not fit resident there, so the plan
    places it with model CPU offload, not as the float8 Wan that would have fit."""
    plan = decide(load_settings({"WAN_FP8": "1"}), Device("cuda", (8, 6), 47.5, 1))
    assert not plan.settings.wan_fp8 and plan.placement.wan_profile == "offload", plan
    assert plan.notes == ("WAN_FP8 is ignored on cuda: float8 matmuls need a GPU of compute capability 8.9+ "
                          "(Ada, Hopper)",)
