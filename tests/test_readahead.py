"""Reading the weights ahead of the loader (readahead.py): every file of the components named, in parallel
chunks; what a new worker reads from its process start and when that read stops (an image job first, a plan
that turned a switch off); the memory a read may fill, the container's limit included; faults that must never
stop a worker from starting."""

from __future__ import annotations

import re
from pathlib import Path

import readahead
import weights


def test_read_ahead_reads_every_weight_file_of_the_components_it_is_given(tmp_path):
    """The loader's files, read in the background: every .safetensors file of the named components, nothing else,
    each file in chunks (a 150 MB file is three 64 MB reads running at once, not one stream)."""
    for sub, sizes in (("transformer", (150_000_000, 5_000_000)), ("vae", (70_000,)), ("unused", (1_000,))):
        (tmp_path / sub).mkdir()
        for i, size in enumerate(sizes):
            with open(tmp_path / sub / f"part-{i}.safetensors", "wb") as fh:
                fh.truncate(size)
        (tmp_path / sub / "config.json").write_text("{}")
    reading = readahead.start(str(tmp_path), ("transformer", "vae", "missing"))
    assert reading.result(timeout=60) == reading.total == 155_070_000


def sparse_model(folder: Path, gb: float) -> Path:
    """A Wan folder whose transformer holds one sparse file of `gb` GB (no disk used; reading it takes a while)."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "wb") as fh:
        fh.truncate(int(gb * 1e9))
    return folder


def test_a_worker_reads_the_wan_weights_from_its_start_and_an_image_job_stops_that_guess(tmp_path, caplog):
    """With no model loading at start-up, the worker guesses that the first job is a video and reads Wan's files
    from the process start; an image job coming first stops the read (the disk is SDXL's then), and a later
    video job's load reads what was left."""
    from model_handler import ModelHandler
    from plan import decide
    from settings import load_settings

    folder = sparse_model(tmp_path / "wan", 4.0)
    settings = load_settings({"WAN_MODEL_ID": str(folder), "SDXL_MODEL_ID": str(tmp_path / "no-sdxl")})
    caplog.set_level("INFO", logger="worker")
    reading = readahead.at_start(settings)
    assert reading["wan"].guess and reading["wan"].total == 4_000_000_000
    models = ModelHandler(decide(settings), reading)
    try:
        models.model("image")  # no SDXL weights here: the job fails, after stopping the guessed read
    except Exception:  # noqa: BLE001 - the failure is not what this test is about
        pass
    done = reading["wan"].result(timeout=60)
    assert done < 4_000_000_000
    assert re.search(r"stopped reading Wan2.1 I2V ahead after [\d.]+ of 4.0 GB: the first job is for sdxl",
                     caplog.text), caplog.text
    assert "as a guess that the first job is a video" in caplog.text
    # The files are free again: a video job's load reads them itself.
    again = readahead.start(str(folder), weights.wan_parts(str(folder), False))
    assert again.total == 4_000_000_000
    again.stop("the test is over")
    again.result(timeout=60)


def test_the_loader_leaves_files_to_the_start_up_read_that_is_reading_them(tmp_path):
    """While the start-up read is under way, the load's own read of the same files reads nothing again; once it
    has been stopped (the plan turned WAN_FP8 off, say), or has ended, a later load reads them ahead anew."""
    folder = sparse_model(tmp_path / "wan", 4.0)
    first = readahead.start(str(folder), ("transformer",))
    assert readahead.start(str(folder), ("transformer",)).result(timeout=60) == 0
    first.stop("the test saw enough")
    # At once, while the stopped read's last chunks are still in flight: the files are the loader's again.
    later = readahead.start(str(folder), ("transformer",))
    assert later.total == 4_000_000_000
    first.result(timeout=60)
    assert readahead.start(str(folder), ("transformer",)).result(timeout=60) == 0  # `later` still holds them
    later.stop("the test is over")
    later.result(timeout=60)


def test_the_plan_revises_the_start_up_read(tmp_path, caplog):
    """WAN_FP8 turned off for this GPU: a read of the stored float8 transformer stops (the load reads the bf16
    one); WAN_COMPILE turned off: Wan no longer loads at start-up, so the read becomes a guess."""
    from settings import load_settings

    folder = sparse_model(tmp_path / "wan", 4.0)
    (folder / "transformer-fp8").mkdir()
    with open(folder / "transformer-fp8" / "diffusion_pytorch_model.safetensors", "wb") as fh:
        fh.truncate(2 * 10**9)
    caplog.set_level("INFO", logger="worker")
    reading = readahead.at_start(load_settings({"WAN_MODEL_ID": str(folder), "WAN_FP8": "1",
                                                    "WAN_COMPILE": "1"}))
    assert not reading["wan"].guess
    readahead.revise(reading, load_settings({"WAN_MODEL_ID": str(folder)}))
    assert reading["wan"].guess
    assert reading["wan"].result(timeout=60) < 2 * 10**9
    assert "stopped reading Wan2.1 I2V ahead after" in caplog.text
    assert "WAN_FP8 is off on this GPU, so the load reads transformer/" in caplog.text


def test_what_a_new_worker_reads_first_follows_what_it_loads_at_start(tmp_path):
    """Wan's files are read from the start when Wan loads at start-up (then an image job does not stop them);
    when only SDXL loads at start-up nothing is guessed; weights not on this worker are left to the load."""
    from settings import load_settings

    def model_folder(n: int) -> dict[str, str]:  # one folder per start: a file read once is not read ahead again
        folder = sparse_model(tmp_path / f"wan-{n}", 0.01)
        (folder / "transformer-fp8").mkdir()
        (folder / "transformer-fp8" / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 1000)
        return {"WAN_MODEL_ID": str(folder)}

    for n, (extra, guess, transformer) in enumerate((
            ({}, True, "transformer"), ({"PRELOAD_MODELS": "wan"}, False, "transformer"),
            ({"WAN_COMPILE": "1", "WAN_FP8": "1"}, False, "transformer-fp8"))):
        reading = readahead.at_start(load_settings(model_folder(n) | extra))["wan"]
        assert reading.guess == guess and reading.files[0].parent.name == transformer, extra
        assert reading.result(timeout=60) == reading.total > 0
    env = model_folder(3)
    assert readahead.at_start(load_settings(env | {"PRELOAD_MODELS": "sdxl"})) == {}
    assert readahead.at_start(load_settings(env | {"SDXL_COMPILE": "1"})) == {}
    assert readahead.at_start(load_settings({"WAN_MODEL_ID": str(tmp_path / "nothing-here")})) == {}


def test_a_read_ahead_that_would_not_fit_in_the_containers_memory_is_not_started(tmp_path, monkeypatch, caplog):
    """A container's memory limit (cgroup) below the machine's free memory: reading more than fits would drop the
    first bytes before the loader came for them, so nothing is read and the log says why."""
    folder = sparse_model(tmp_path / "wan", 0.5)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{700 * 10**6}\n")
    (cgroup / "memory.current").write_text(f"{300 * 10**6}\n")
    (cgroup / "memory.stat").write_text(f"anon 100000000\ninactive_file {200 * 10**6}\n")  # cached: reclaimable
    monkeypatch.setattr(readahead, "CGROUP", cgroup)
    caplog.set_level("INFO", logger="worker")
    assert readahead.start(str(folder), ("transformer",), "Wan2.1 I2V").result(timeout=30) == 0
    assert "not reading Wan2.1 I2V ahead: its 0.5 GB would not fit in the 0.6 GB of free memory" in caplog.text
    (cgroup / "memory.max").write_text("max\n")  # no limit: the machine's free memory decides
    assert readahead.start(str(folder), ("transformer",), "Wan2.1 I2V").result(timeout=30) == 500_000_000


def test_page_cache_that_can_be_reclaimed_counts_as_free_memory(tmp_path, monkeypatch, caplog):
    """A machine whose memory is mostly page cache (an earlier model's files, say) still reads ahead: what the
    kernel can reclaim (MemAvailable) counts as free, not only the memory no page uses (MemFree)."""
    folder = sparse_model(tmp_path / "wan", 0.5)
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(readahead, "MEMINFO", meminfo)
    monkeypatch.setattr(readahead, "CGROUP", tmp_path / "no-cgroup")  # no container limit
    caplog.set_level("INFO", logger="worker")
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:   12000000 kB\n")
    assert readahead.start(str(folder), ("transformer",), "Wan2.1 I2V").result(timeout=30) == 500_000_000
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:          100000 kB\nMemAvailable:     700000 kB\n")
    assert readahead.start(str(folder), ("transformer",), "Wan2.1 I2V").result(timeout=30) == 0
    assert "not reading Wan2.1 I2V ahead: its 0.5 GB would not fit in the 0.7 GB of free memory" in caplog.text


def test_a_fault_before_the_read_starts_leaves_the_files_to_the_loader(tmp_path, monkeypatch, caplog):
    """The loader's own read is only a speed-up: a fault while sizing it logs one warning and the load goes on."""
    folder = sparse_model(tmp_path / "wan", 0.01)

    def unreadable() -> int:
        raise PermissionError("/proc/meminfo: permission denied")

    monkeypatch.setattr(readahead, "free_memory", unreadable)
    assert readahead.start(str(folder), ("transformer",), "Wan2.1 I2V").result(timeout=5) == 0
    assert "not reading Wan2.1 I2V ahead (PermissionError: /proc/meminfo: permission denied)" in caplog.text
    monkeypatch.undo()
    assert readahead.start(str(folder), ("transformer",)).result(timeout=30) == 10_000_000  # nothing left claimed


def test_a_broken_weight_file_link_is_left_to_the_loader_and_the_rest_is_read(tmp_path):
    """A cache snapshot whose link points at a blob that is not there (a fetch cut short): the start-up read skips
    it instead of failing the worker's start; the loader meets it and says what is wrong."""
    from settings import load_settings

    folder = sparse_model(tmp_path / "wan", 0.01)
    (folder / "transformer" / "other.safetensors").symlink_to(tmp_path / "blobs" / "gone")
    reading = readahead.at_start(load_settings({"WAN_MODEL_ID": str(folder)}))["wan"]
    assert reading.result(timeout=60) == 10_000_000
    assert [f.name for f in reading.files] == ["diffusion_pytorch_model.safetensors"]
