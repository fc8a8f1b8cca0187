#!/usr/bin/env python3
"""The disk's read speed: one sequential stream (as `cat` reads) against the worker's read-ahead
(readahead.Reading: 64 MB chunks, READ_AHEAD_THREADS readers), page cache dropped before each read.

    python benchmarks/disk.py --gb 4                # a file of that size written here first, then removed
    python benchmarks/disk.py --files F1 F2 ...     # these files (cold_start.py --disk passes Wan's)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import readahead  # noqa: E402


def evict(paths: list[Path], everything: bool = True) -> str:
    """Drop these files from the page cache (and the whole cache where allowed, as root); returns what was done."""
    os.sync()  # dirty pages cannot be dropped
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done += 1
        finally:
            os.close(fd)
    how = f"posix_fadvise(DONTNEED) on {done} files"
    if not everything:
        return how
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return how + " + drop_caches"
    except OSError as err:
        return how + f" (drop_caches: {err.strerror})"


def one_stream(files: list[Path]) -> None:
    buffer = bytearray(16 * 1024**2)
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buffer):
                pass


def measure(files: list[Path], readers: tuple[int, ...] = (readahead.READ_AHEAD_THREADS,)) -> dict:
    """GB/s of one stream and of the read-ahead with each number of readers, the page cache dropped first."""
    gb = sum(f.stat().st_size for f in files) / 1e9
    lanes = {"one_stream": lambda: one_stream(files)}
    for n in readers:
        lanes[f"read_ahead_{n}_readers"] = lambda n=n: _read_ahead(files, n)
    out: dict = {"gb": round(gb, 2), "files": len(files)}
    for name, run in lanes.items():
        evict(files)
        start = time.perf_counter()
        run()
        out[f"{name}_gb_per_s"] = round(gb / (time.perf_counter() - start), 2)
    return out


def _read_ahead(files: list[Path], readers: int) -> None:
    default, readahead.READ_AHEAD_THREADS = readahead.READ_AHEAD_THREADS, readers
    try:
        readahead.Reading("disk probe", files).result()
    finally:
        readahead.READ_AHEAD_THREADS = default


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=4.0, help="size of the file written for the probe")
    p.add_argument("--files", type=Path, nargs="*", help="read these instead")
    p.add_argument("--readers", default="8,16", help="read-ahead reader counts, comma-separated")
    args = p.parse_args()
    readers = tuple(int(n) for n in args.readers.split(","))
    if args.files:
        print(json.dumps(measure(args.files, readers)))
        return 0
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:  # on the disk under test, not a tmpfs
        path = Path(folder) / "probe.bin"
        block = os.urandom(64 * 1024**2)
        with open(path, "wb") as fh:
            for _ in range(int(args.gb * 1e9) // len(block)):
                fh.write(block)
        print(json.dumps(measure([path], readers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
