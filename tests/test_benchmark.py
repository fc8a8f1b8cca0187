"""benchmarks/bench.py runs its whole code path on tiny models on CPU: builder, worker and plain-diffusers jobs,
phase hooks, cold start in a fresh process, ratios and the report (the GPU run uses the same code)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str, float]:
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--out", str(out),
         "--workdir", str(tmp_path / "models"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "bench.md").read_text().startswith("## Worker benchmark (tiny)")
    return json.loads((out / "bench.json").read_text()), proc.stdout, elapsed


@pytest.mark.timeout(240)
def test_tiny_run_measures_worker_and_plain_diffusers(tmp_path: Path) -> None:
    results, stdout, elapsed = run_bench(tmp_path)
    assert results["errors"] == [], results["errors"]
    for impl in ("worker", "plain"):
        video = results["jobs"][impl]["video81"]
        assert video["wall_s"] > 0 and video["step_s_steady"] > 0 and video["denoise_s"] > 0
        assert len(video["step_s"]) == video["steps"] == 2
        assert video["transformer_calls"] == 4  # classifier-free guidance: two forwards per step
        assert video["vae_decode_s"] > 0 and video["mp4_encode_s"] > 0 and video["e2e_40_steps_extrapolated"]
        assert {"text_encode", "image_encode", "vae_encode", "denoise", "vae_decode", "mp4_encode"} <= set(
            video["phases"])
        image = results["jobs"][impl]["image"]
        assert image["wall_s"] > 0 and image["base_step_s_steady"] > 0 and image["refiner_step_s_steady"] > 0
        assert image["png_encode_s"] > 0
        assert results["load"][impl]["wan"]["wall_s"] > 0 and results["load"][impl]["sdxl"]["bytes"] > 0
    for job in ("video81", "image"):
        assert results["ratios"][job]["wall_s"] > 0
    assert results["ratios"]["video81"]["step_s_steady"] > 0
    assert results["ratios"]["image"]["base_step_s_steady"] > 0
    # The worker's video job ran at the requested size through handler.handler.
    assert (results["jobs"]["worker"]["video81"]["height"], results["jobs"]["worker"]["video81"]["width"]) == (64, 64)
    cold = results["cold_start"]
    assert cold["worker"]["rc"] == 0 and cold["worker"]["start_to_result_s"] > 0
    assert cold["worker"]["timings"]["load_s"] > 0 and cold["worker"]["load_gb_per_s"] > 0
    assert cold["plain"]["start_to_result_s"] > 0
    assert results["disk"]["cold_gb_per_s"] > 0
    assert results["meta"]["torch"] and results["meta"]["diffusers"] and "bench.py" in results["meta"]["command"]
    assert "| worker/plain |" in stdout  # the table is printed last
    print(f"tiny benchmark took {elapsed:.1f}s")


@pytest.mark.timeout(240)
def test_tiny_memory_profile_runs_in_a_subprocess(tmp_path: Path) -> None:
    results, _, _ = run_bench(tmp_path, "--only", "profiles")
    profile = results["profiles"]["48"]
    assert profile["rc"] == 0, profile
    assert "keep_both" in profile["placement"]
    assert profile["job"]["wall_s"] > 0 and profile["job"]["step_s_steady"] > 0
    assert profile["worker_override"] == "gpu_memory_gib"  # the Settings field that carries the card size


def test_step_times_group_cfg_calls_into_steps() -> None:
    # 3 steps x 2 forwards (cond, uncond): each step runs from its first call to the next step's first call.
    calls = [(0.0, 1.0), (1.0, 2.0), (2.5, 3.5), (3.5, 4.5), (5.0, 6.0), (6.0, 7.0)]
    assert bench.step_times(calls, 3) == [2.5, 2.5, 2.0]
    assert bench.steady([9.0, 2.5, 2.0]) == 2.25
    assert bench.step_times([], 3) == []


def test_phase_tracker_splits_time_between_hooked_modules() -> None:
    import torch

    tracker = bench.PhaseTracker(cuda=False)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    tracker.on_forward(first, "encode")
    tracker.on_forward(second, "denoise", timed="second")
    tracker.enter("prepare")
    first(torch.zeros(1, 4))
    for _ in range(3):
        second(torch.zeros(1, 4))
    tracker.finish()
    assert list(tracker.phases) == ["prepare", "encode", "denoise"]
    assert len(tracker.calls["second"]) == 3
    tracker.remove()
    second(torch.zeros(1, 4))
    assert len(tracker.calls["second"]) == 3  # hooks are gone


def test_ratios_and_report_from_partial_results() -> None:
    results = {
        "meta": {"mode": "quick", "gpu": "NVIDIA H100 80GB HBM3"},
        "jobs": {"worker": {"video81": {"wall_s": 30.0, "step_s_steady": 6.0, "frames": 81, "height": 480,
                                        "width": 832, "steps": 2}},
                 "plain": {"video81": {"wall_s": 40.0, "step_s_steady": 6.6}}},
        "load": {}, "cold_start": {}, "profiles": {"24": {"load_error": "OutOfMemoryError: CUDA out of memory"}},
        "skipped": [{"what": "plain video33", "why": "time budget"}], "errors": [],
    }
    results["ratios"] = bench.compute_ratios(results)
    assert results["ratios"]["video81"]["wall_s"] == pytest.approx(0.75)
    text = bench.render_markdown(results)
    assert "| video 480x832, 81 frames (2 steps) | end-to-end s (measured steps, wall) | 30.00 | 40.00 | 0.75 |" in text
    assert "load failed: OutOfMemoryError" in text and "plain video33 (time budget)" in text
