"""benchmarks/ on CPU, tiny models, the code the GPU runs: the random-model builder's output loads through the
worker, bench.py measures the worker and plain diffusers in one process and writes its JSON and goals.json, and
cold_start.py starts the worker as deployed (`python handler.py --test_input`) and times it to its MP4."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import cold_start  # noqa: E402

FIGURES = {"quality_e2e_s", "quality_s_per_step", "fast_e2e_s", "sdxl_default_job_s", "cold_start_default_s",
           "cold_start_cached_s", "cold_start_empty_s"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    models, out = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("out")
    rc = bench.main(["--tiny", "--models", str(models), "--out", str(out), "--goals"])
    results = json.loads((out / "bench-tiny.json").read_text())
    assert rc == 0, results["errors"]
    return models, out, results


def test_bench_measures_worker_and_plain_on_models_the_builder_wrote(tiny_run) -> None:
    models, _, results = tiny_run
    assert set(results["build_s"]) == {"sdxl", "wan"}  # built by download_weights.build_random, loaded by the worker
    assert results["gpu"] == "CPU" and results["torch"] and "bench.py" in results["command"]
    for job in ("video81", "video33", "fast", "image"):
        for impl in ("worker", "plain"):
            assert results["jobs"][job][impl]["e2e_s"] > 0, (job, impl)
        assert results["jobs"][job]["worker/plain"]["e2e_s"] > 0
    video = results["jobs"]["video81"]
    assert video["worker"]["steps"] == 2 and video["worker"]["s_per_step"] > 0 and video["plain"]["s_per_step"] > 0
    assert video["worker"]["timings"]["inference_s"] > 0  # the worker's own timings
    assert (video["worker"]["width"], video["worker"]["height"]) == (64, 64)
    fast = results["jobs"]["fast"]
    assert fast["worker"]["steps"] == 4 and fast["worker"]["first_e2e_s"] > 0  # the preset, LoRA fused
    assert (models / "loras" / "fast-rank4.safetensors").exists()
    # Default settings: the worker's transformer is plain diffusers' (same weights, float32 on CPU).
    assert results["jobs"]["forward"]["plain"]["worker_rel_err"] < 1e-5


def test_goals_json_has_the_shape_issue_12_asks_for(tiny_run) -> None:
    _, out, _ = tiny_run
    goals = json.loads((out / "goals.json").read_text())
    assert set(goals) == {"gpu", "date", "torch", "command", "figures"}
    assert set(goals["figures"]) == FIGURES
    assert all(set(pair) == {"worker", "plain"} for pair in goals["figures"].values())
    for name in ("quality_e2e_s", "quality_s_per_step", "fast_e2e_s", "sdxl_default_job_s"):
        assert goals["figures"][name]["worker"] > 0 and goals["figures"][name]["plain"] > 0
    assert goals["figures"]["cold_start_default_s"] == {"worker": None, "plain": None}  # no cold_start.json yet


def test_cold_start_times_a_fresh_worker_and_fills_goals(tiny_run) -> None:
    models, out, _ = tiny_run
    rc = cold_start.main(["--tiny", "--models", str(models), "--shapes", "64x64x5", "--configs", "default,plain",
                          "--out", str(out), "--timeout", "240"])
    cold = json.loads((out / "cold_start.json").read_text())
    assert rc == 0, cold
    worker, plain = cold["runs"]["default 64x64x5"], cold["runs"]["plain 64x64x5"]
    assert worker["rc"] == 0 and 0 < worker["start_to_result_s"] < worker["exit_s"] + 1
    assert worker["timings"]["inference_s"] > 0 and worker["s_per_step"] > 0
    assert "posix_fadvise" in worker["eviction"]
    # Where the start went, from the worker's own start-up lines: imports, the weights read, and at what rate.
    phases = worker["phases"]
    assert phases["imports_s"] > 0 and phases["wan_imports_s"] > 0 and phases["wan_weights_s"] > 0, phases
    assert phases["wan_weights_gb"] >= 0 and "wan_weights_gb_per_s" in phases, phases
    # The Wan files were read ahead from the process start (a first job's guess), before the imports ended.
    assert {"read_ahead_gb", "read_ahead_s", "read_ahead_gb_per_s"} <= set(phases), phases  # the line was parsed
    at = worker["timeline"]
    assert at["read_ahead_done"] <= at["imports_done"] < at["wan_loaded"] < at["first_step_done"] <= \
        at["last_step_done"] < at["mp4_written"] < worker["exit_s"], at
    assert "read Wan2.1 I2V ahead" in (out / "cold-default-64x64x5.log").read_text()  # each start's log is kept
    assert plain["start_to_result_s"] > 0 and plain["load_s"] > 0
    assert bench.main(["--goals", "--from", str(out / "bench-tiny.json"), "--out", str(out)]) == 0
    figures = json.loads((out / "goals.json").read_text())["figures"]
    assert figures["cold_start_default_s"] == {"worker": worker["start_to_result_s"],
                                               "plain": plain["start_to_result_s"]}
    assert figures["cold_start_cached_s"]["worker"] is None  # not run here: WAN_COMPILE on CPU


def test_goals_table_says_by_how_much_a_goal_is_missed() -> None:
    data = {"gpu": "H200", "date": "d", "torch": "2.11", "command": "c",
            "figures": {name: {"worker": None, "plain": None} for name in FIGURES}}
    data["figures"]["quality_e2e_s"] = {"worker": 180.0, "plain": 270.0}
    data["figures"]["sdxl_default_job_s"] = {"worker": 1.5, "plain": 3.0}
    table = bench.goals_table(data)
    assert "| quality_e2e_s | <= 150 | 180.0 | 270.0 | 0.667 | no (+20%) |" in table
    assert "| sdxl_default_job_s | <= 1.8 | 1.5 | 3 | 0.5 | yes |" in table
