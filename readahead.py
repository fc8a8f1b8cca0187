"""Reading weight files into the page cache ahead of the loader, and what a new worker reads first.

A cold start's longest part is reading the weights from disk. `start` reads a model's files in 64 MB
chunks, several at once, in the order diffusers then reads them, so the loader following behind finds
them in memory (one stream is slower on an NVMe disk, and one large file gets the parallel reads too).
`at_start` begins that for Wan before the worker imports torch and diffusers (handler.main): when Wan
loads at start-up, or as a guess that the first job is a video (an image job stops it); `revise` adjusts
it to the settings the plan decided. Only stdlib and the weights' locations are imported here.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import weights
from errors import first_line
from settings import Settings

log = logging.getLogger("worker")
READ_AHEAD_THREADS = 8  # parallel readers of the weight files (an NVMe disk serves several streams faster)
READ_CHUNK = 64 * 1024**2  # bytes one reader takes at a time
CGROUP = Path("/sys/fs/cgroup")  # the container's memory limit, where the kernel shows it
MEMINFO = Path("/proc/meminfo")  # the machine's memory, page cache that can be reclaimed included


class Reading:
    """Weight files being read into the page cache by a few threads, in the order a loader reads them: each file
    in chunks, several chunks at once, so the front of the read moves at the disk's speed (one stream is slower
    on an NVMe disk) and a loader following behind finds its next bytes in memory. `stop()` ends it after the
    chunks in flight; `result()` gives the bytes read. One line in the log when it ends. The readers are daemon
    threads: a worker that exits (a bad setting, the end of a local test) does not wait for them."""

    def __init__(self, what: str, files: list[Path], guess: bool = False, sizes: list[int] | None = None) -> None:
        self.what, self.files, self.guess = what, files, guess
        sizes = [f.stat().st_size for f in files] if sizes is None else sizes
        self.total = sum(sizes)
        self._stop, self._why_stopped, self._failed = threading.Event(), "", ""
        self._start = time.perf_counter()
        self._done: concurrent.futures.Future = concurrent.futures.Future()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        for f, size in zip(files, sizes, strict=True):
            for offset in range(0, size, READ_CHUNK):
                self._chunks.put((f, offset, min(READ_CHUNK, size - offset)))
        self._read = [0] * READ_AHEAD_THREADS
        if not files:  # nothing to read: done at once, no threads
            self._finish([])
            return
        readers = [threading.Thread(target=self._reader, args=(n,), daemon=True, name=f"read-ahead-{n}")
                   for n in range(READ_AHEAD_THREADS)]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._finish, args=(readers,), daemon=True).start()

    def stop(self, why: str) -> None:
        if not self._stop.is_set():
            self._why_stopped = why
            self._stop.set()
            self._release()  # the loader may read the rest now, not only once the chunks in flight are done

    def _release(self) -> None:
        with _CLAIMS_LOCK:
            for f in self.files:
                if _CLAIMED.get(f) is self:
                    del _CLAIMED[f]

    def result(self, timeout: float | None = None) -> int:
        return self._done.result(timeout)

    def _reader(self, n: int) -> None:
        buffer = memoryview(bytearray(min(16 * 1024**2, self.total)))  # small files: no 16 MB buffers
        try:
            while not self._stop.is_set():
                try:
                    path, offset, length = self._chunks.get_nowait()
                except queue.Empty:
                    return
                with open(path, "rb", buffering=0) as fh:
                    fh.seek(offset)
                    left = length
                    while left and (got := fh.readinto(buffer[:min(len(buffer), left)])):
                        left -= got
                        self._read[n] += got
        except Exception as err:  # noqa: BLE001 - only a speed-up: the loader reads the files and reports their faults
            self._failed = f"{type(err).__name__}: {first_line(err)}"
            self._stop.set()  # the chunks still queued are left to the loader
            self._release()

    def _finish(self, readers: list[threading.Thread]) -> None:
        for reader in readers:
            reader.join()
        done, seconds = sum(self._read), time.perf_counter() - self._start
        self._release()  # only a read in flight needs its files to itself; a later load may read them again
        if self._failed:
            log.warning("reading %s ahead failed after %.1f GB (%s); the loader reads the rest itself", self.what,
                        done / 1e9, self._failed)
        elif self._stop.is_set():
            log.info("stopped reading %s ahead after %.1f of %.1f GB: %s", self.what, done / 1e9, self.total / 1e9,
                     self._why_stopped)
        elif self.files:
            log.info("read %s ahead: %.1f GB in %.1f s (%.2f GB/s, %d readers)", self.what, done / 1e9, seconds,
                     done / 1e9 / max(seconds, 1e-9), READ_AHEAD_THREADS)
        self._done.set_result(done)


_CLAIMED: dict[Path, Reading] = {}  # files a Reading is reading: another start() of them leaves them to it
_CLAIMS_LOCK = threading.RLock()  # start() holds it while a Reading with no files finishes at once


def start(folder: str, subfolders: Iterable[str], what: str | None = None, guess: bool = False,
          why: str = "") -> Reading:
    """Start reading a model's weight files (the .safetensors of `subfolders`, in that order) into the page
    cache; returns at once. Files another Reading is still reading are left to it (the loader's own call,
    while the start-up read runs). Nothing is read when the files would not fit beside what memory is
    free: the read would evict its own first bytes before the loader came."""
    what = what or Path(folder).name
    try:
        wanted = weight_files(folder, subfolders)
        with _CLAIMS_LOCK:
            files = [f for f in wanted if f not in _CLAIMED]
            sizes = [f.stat().st_size for f in files]
            free = free_memory()
            if sum(sizes) > 0.6 * free:
                log.info("not reading %s ahead: its %.1f GB would not fit in the %.1f GB of free memory", what,
                         sum(sizes) / 1e9, free / 1e9)
                files, sizes = [], []
            if files:
                log.info("reading %s ahead: %.1f GB in %d files of %s%s", what, sum(sizes) / 1e9, len(files),
                         ", ".join(dict.fromkeys(f.parent.name for f in files)), f", {why}" if why else "")
            reading = Reading(what, files, guess, sizes)
            _CLAIMED.update(dict.fromkeys(files, reading))
        return reading
    except Exception as err:  # noqa: BLE001 - a speed-up must never fail a load: the loader reads the files itself
        log.warning("not reading %s ahead (%s: %s)", what, type(err).__name__, first_line(err))
        return Reading(what, [], guess)


def weight_files(folder: str | Path, subfolders: Iterable[str]) -> list[Path]:
    """The .safetensors files of these subfolders, in the loader's order. A broken link (a half-fetched cache) is
    left out: it is the loader's to report, in its own sentence."""
    return [f for sub in subfolders for f in sorted((Path(folder) / sub).glob("*.safetensors")) if f.is_file()]


def free_memory() -> int:
    """Bytes a read into the page cache may fill: the machine's available memory, or what the container's memory
    limit leaves (cgroup v2, or v1), when that is less: past it the kernel drops the container's oldest cached
    pages. Page cache that can be reclaimed counts as free, since a read takes over the oldest cached pages
    first: MemAvailable for the machine, the inactive part of the container's usage for the container."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        free = int(fields["MemAvailable"].split()[0]) * 1024  # kB
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit, used, stat, reclaimable in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                           ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                            "memory/memory.stat", "total_inactive_file")):
        try:
            cap, usage = (CGROUP / limit).read_text().strip(), int((CGROUP / used).read_text())
        except (OSError, ValueError):
            continue
        if not cap.isdigit():  # "max": no limit
            return free
        try:
            stats = dict(line.split() for line in (CGROUP / stat).read_text().splitlines() if line.count(" ") == 1)
            usage -= int(stats.get(reclaimable, 0))
        except (OSError, ValueError):
            pass
        return min(free, int(cap) - usage)
    return free


def at_start(settings: Settings) -> dict[str, Reading]:
    """What a new worker starts reading before anything else (Python's imports of torch and diffusers take
    seconds): the Wan files when Wan loads at start-up (PRELOAD_MODELS, WAN_COMPILE), or, when no model loads at
    start-up, as a guess that the first job is a video (an image job stops it). Weights that are not on this
    worker yet are fetched by the load, not read here. Never raises: it is only a speed-up."""
    wan_at_start = settings.loads_at_start("wan")
    if not wan_at_start and settings.loads_at_start("sdxl"):
        return {}  # SDXL alone at start-up: an endpoint that serves images first
    why = "as Wan loads at start-up" if wan_at_start else "as a guess that the first job is a video"
    try:
        folder = weights.local_folder("wan-i2v", settings.wan_model_id, download=False, model_dir=settings.model_dir)
        return {"wan": start(folder, weights.wan_parts(folder, settings.wan_fp8), "Wan2.1 I2V",
                             guess=not wan_at_start, why=f"from the process start ({why})")}
    except weights.ModelUnavailable:  # not on this worker: the load fetches it, or says why it cannot
        return {}
    except Exception as err:  # noqa: BLE001 - a speed-up must never stop a worker from starting
        log.warning("not reading Wan2.1 I2V ahead at start-up (%s: %s)", type(err).__name__, first_line(err))
        return {}


def revise(reading: dict[str, Reading], settings: Settings) -> None:
    """The start-up read against the settings as the plan decided them (it may turn WAN_FP8 or WAN_COMPILE off
    for this GPU): a read of a transformer the load will not use stops; one for a Wan that no longer loads at
    start-up becomes a guess, which an image job stops."""
    wan = reading.get("wan")
    if wan is None:
        return
    if not settings.wan_fp8 and any(f.parent.name == weights.FLOAT8_TRANSFORMER for f in wan.files):
        wan.stop("WAN_FP8 is off on this GPU, so the load reads transformer/")
    wan.guess = wan.guess or not settings.loads_at_start("wan")
