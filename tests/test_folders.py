"""The folders the worker writes: the temp folder (TMPDIR) for MP4s, COMPILE_CACHE_DIR, LOCAL_OUTPUT_DIR (the LoRA
cache, LORA_CACHE_DIR, is tested in test_loras). A full disk, a read-only folder and a file where a folder should be
each fail with one sentence naming the setting and the fix, and the next job succeeds; start-up reports a folder that
cannot work, once, and removes the temp folders a killed worker left behind.

Full and read-only disks are real: small tmpfs mounts (`tmpfs` fixture; skipped where mounting is not allowed).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode_data_uri, png_b64
from media import frames_to_mp4, probe_mp4
from test_cli import run

import folders
import storage
import video_utils
from errors import ResourceError
from models.compile_cache import CompileCache
from settings import load_settings

VIDEO = {"mode": "video", "prompt": "a cat walks", "height": 64, "width": 64, "num_frames": 9,
         "num_inference_steps": 2, "seed": 7}
IMAGE = {"prompt": "a red car", "height": 128, "width": 128, "num_inference_steps": 2,
         "refiner_inference_steps": 2, "seed": 5}


def full_disk(setting: str, folder: Path) -> str:
    """The end of the sentence for a full disk, as a regex (the free space left varies)."""
    return (rf"the disk holding {setting}='{re.escape(str(folder))}' is full \([\d.]+ MB free\); free space there "
            rf"or set {setting} to a folder on a larger disk\.")


def read_only(setting: str, folder: Path) -> str:
    return (f"{setting}='{folder}' is not writable (Read-only file system); set {setting} to a folder this worker "
            f"can write.")


@pytest.fixture()
def temp_dir(monkeypatch):
    """Point the worker's temp folder (tempfile's, which honours TMPDIR) somewhere else for this test."""
    def use(path: Path) -> None:
        monkeypatch.setenv("TMPDIR", str(path))
        monkeypatch.setattr(tempfile, "tempdir", str(path))

    return use


# ---------------------------------------------------------------------------------------------
# The temp folder of the MP4 encoder
# ---------------------------------------------------------------------------------------------
def test_a_full_temp_disk_fails_the_video_with_a_sentence_and_the_next_job_succeeds(run_job, tmpfs, temp_dir,
                                                                                   monkeypatch):
    disk = tmpfs("8k")  # the 9-frame tiny video is ~15 KB
    temp_dir(disk)
    result = run_job({**VIDEO, "image_url": png_b64()})
    assert list(result) == ["error"], result
    assert re.fullmatch("The MP4 could not be written: " + full_disk("TMPDIR", disk), result["error"]), result
    assert os.listdir(disk) == []  # the partial MP4 went with its folder
    monkeypatch.undo()
    video = probe_mp4(decode_data_uri(run_job({**VIDEO, "image_url": png_b64()})["video"], "video/mp4"))
    assert video["frames"] == 9


def test_an_mp4_cut_short_by_a_full_disk_is_never_returned(tmpfs, temp_dir):
    """ffmpeg takes every frame and then fails writing the end of the file (its index): imageio-ffmpeg's writer
    ignored that exit status and handed back the truncated file."""
    frames = np.random.default_rng(0).integers(0, 256, (9, 64, 96, 3), dtype=np.uint8)  # ~38 KB as H.264
    disk = tmpfs("24k")
    temp_dir(disk)
    with pytest.raises(ResourceError) as err:
        frames_to_mp4(frames, 16)
    assert re.fullmatch("The MP4 could not be written: " + full_disk("TMPDIR", disk), str(err.value))
    assert os.listdir(disk) == []


def test_a_read_only_temp_folder_fails_the_video_before_it_is_generated(run_job, tiny_models, tmpfs, temp_dir,
                                                                        monkeypatch):
    disk = tmpfs(read_only=True)
    temp_dir(disk)
    calls = []
    wan, _ = tiny_models.model("video")
    hook = wan.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = run_job({**VIDEO, "image_url": png_b64()})
    finally:
        hook.remove()
    assert result == {"error": "The MP4 could not be written: " + read_only("TMPDIR", disk)}
    assert calls == []  # refused before any denoising step
    monkeypatch.undo()
    assert run_job({**VIDEO, "image_url": png_b64()})["num_frames"] == 9


def test_remove_leftovers_deletes_the_temp_folders_of_stopped_workers_only(tmp_path):
    beyond_any_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    dead = tmp_path / f"mp4-{beyond_any_pid}-k1ll3d"  # what a worker killed mid-job leaves
    dead.mkdir()
    (dead / "video.mp4").write_bytes(b"\0" * 36_000)
    # This process's pid at start-up is a previous worker's: a restarted container gives its worker the same pid.
    same_pid = tmp_path / f"mp4-{os.getpid()}-b3f0re"
    same_pid.mkdir()
    with subprocess.Popen(["sleep", "60"]) as other_worker:  # a worker that shares the temp folder, still running
        running = tmp_path / f"mp4-{other_worker.pid}-w0rk1n"
        running.mkdir()
        kept = [running, tmp_path / "mp4-n0pid", tmp_path / "lora-cache", tmp_path / "mp4-1-a-file"]
        kept[1].mkdir()
        kept[2].mkdir()
        kept[3].write_bytes(b"")
        try:
            removed = video_utils.remove_leftovers(str(tmp_path))
        finally:
            other_worker.kill()
    assert sorted(removed) == sorted([str(dead), str(same_pid)])
    assert sorted(tmp_path.iterdir()) == sorted(kept)


# ---------------------------------------------------------------------------------------------
# Start-up and local runs (python handler.py --test_input, as a user types it)
# ---------------------------------------------------------------------------------------------
def test_start_up_removes_leftovers_reports_each_folder_that_cannot_work_and_a_local_save_fails_with_a_sentence(
        tiny_env, tmp_path, tmpfs):
    temp = tmp_path / "tmp"
    leftover = temp / f"mp4-{int(Path('/proc/sys/kernel/pid_max').read_text()) + 1}-k1ll3d"
    leftover.mkdir(parents=True)
    (leftover / "video.mp4").write_bytes(b"\0" * 36_000)  # a partial MP4
    (tmp_path / "a-file").write_bytes(b"")
    outputs = tmpfs(read_only=True)
    env = tiny_env | {"TMPDIR": str(temp), "LORA_CACHE_DIR": str(tmp_path / "a-file" / "cache"),
                      "LOCAL_OUTPUT_DIR": str(outputs)}
    out = run([sys.executable, "handler.py", "--test_input", json.dumps({"input": IMAGE})], env)
    log = out.stdout + out.stderr
    assert not leftover.exists()
    expected = [
        f"removed 1 temp folder(s) left by a stopped worker: {leftover}",
        f"LORA_CACHE_DIR='{tmp_path}/a-file/cache' is not a folder ({tmp_path}/a-file is a file), so LoRA downloads "
        f"will fail; set LORA_CACHE_DIR to a folder.",
        f"LOCAL_OUTPUT_DIR='{outputs}' is on a read-only file system, so local results cannot be saved; set "
        f"LOCAL_OUTPUT_DIR to a folder this worker can write.",
    ]
    for line in expected:
        assert log.count(line) == 1, (line, log[-3000:])
    # The job ran; its result could not be saved: one sentence, no traceback, exit status 1.
    assert "The result could not be saved locally: " + read_only("LOCAL_OUTPUT_DIR", outputs) in out.stdout, log
    assert "Traceback" not in log and out.returncode == 1, log[-3000:]


def test_save_local_writes_each_result_file_or_says_why_not(run_job, tmpfs, tmp_path):
    result = run_job({**IMAGE, "num_images": 2})
    outputs = tmpfs(read_only=True)
    assert storage.save_local(result, str(outputs), "job-1") == {
        "error": "The result could not be saved locally: " + read_only("LOCAL_OUTPUT_DIR", outputs)}
    saved = storage.save_local(result, str(tmp_path / "out"), "job-1")
    paths = [tmp_path / "out" / "job-1" / f"image-{i}.png" for i in range(2)]
    assert saved["images"] == [str(p) for p in paths] and saved["image_url"] == str(paths[0])
    assert [p.read_bytes() for p in paths] == [decode_data_uri(uri, "image/png") for uri in result["images"]]


def test_check_folders_names_each_folder_that_cannot_work(tmpfs, tmp_path):
    (tmp_path / "a-file").write_bytes(b"")
    locked, small = tmpfs(read_only=True), tmpfs("8k")
    settings = load_settings({"LORA_CACHE_DIR": str(locked / "cache"), "WAN_COMPILE": "1",
                              "COMPILE_CACHE_DIR": str(tmp_path / "a-file"), "LOCAL_OUTPUT_DIR": str(small)})
    assert folders.check_folders(settings, local_outputs=True) == [
        f"LORA_CACHE_DIR='{locked}/cache' (its nearest existing folder, '{locked}') is on a read-only file system, "
        f"so LoRA downloads will fail; set LORA_CACHE_DIR to a folder this worker can write.",
        f"COMPILE_CACHE_DIR='{tmp_path}/a-file' is not a folder ({tmp_path}/a-file is a file), so compiled kernels "
        f"are not kept for the next worker; set COMPILE_CACHE_DIR to a folder.",
        f"The disk holding LOCAL_OUTPUT_DIR='{small}' has 0.0 MB free, so local results cannot be saved once it "
        f"fills; free space there or set LOCAL_OUTPUT_DIR to a folder on a larger disk.",
    ]
    # The compile cache matters only with a compile switch on; local outputs only in local runs.
    fine = load_settings({"LORA_CACHE_DIR": str(tmp_path / "cache"), "COMPILE_CACHE_DIR": str(tmp_path / "a-file"),
                          "LOCAL_OUTPUT_DIR": str(small)})
    assert folders.check_folders(fine, local_outputs=False) == []


def test_a_compile_cache_that_cannot_be_written_names_compile_cache_dir(tmpfs, monkeypatch, caplog):
    locked = tmpfs(read_only=True)
    # What torch hands over after a compile (compiling here would need a C++ compiler and tens of seconds).
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", None))
    caplog.set_level(logging.WARNING, logger="worker")
    assert CompileCache(str(locked), "wan-0123").save() is False
    assert [r.getMessage() for r in caplog.records] == [
        f"compile cache {locked}/wan-0123.bin could not be written: {read_only('COMPILE_CACHE_DIR', locked)[:-1]}; "
        f"the next worker compiles again"]
