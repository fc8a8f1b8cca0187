#!/usr/bin/env python3
"""The CPU's share of a job: encoding the result. A 1024x1024 PNG (SDXL's default job) with PIL's default
zlib settings and with the worker's (run-length strategy), and a 480x832 x 81-frame MP4 (the default video)
with x264 presets, each for noise (what the random-weight benchmark models produce) and for a smooth moving
picture (closer to a real model's output). Milliseconds (best of 3) and bytes. With --image, also a PNG the
benchmark's image job wrote (bench.py saves it beside its JSON), with zlib level 1's default strategy too.

    python benchmarks/encode.py --out results/encode.json [--image results/image-sdxl.png]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from bench import frames_to_mp4, input_image, meta  # also puts the worker's modules on the path
from PIL import Image

from video_utils import png_bytes


def best_ms(fn) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(3):
        start = time.perf_counter()
        size = len(fn())
        times.append(time.perf_counter() - start)
    return round(min(times) * 1000, 1), size


def pil_default_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def level1_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--image", type=Path, help="a PNG the image job made")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    smooth = np.asarray(input_image(1024, 1024).convert("RGB"))
    # A photograph's fine texture: the smooth picture plus mild noise.
    photo = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    images = {"noise": rng.integers(0, 256, smooth.shape, dtype=np.uint8), "photo_like": photo}
    hows = [("pil_default", pil_default_png), ("worker", png_bytes)]
    if args.image:
        images["job_image"] = np.asarray(Image.open(args.image).convert("RGB"))
        hows.append(("level1", level1_png))  # the worker's setting before the run-length strategy
    results = {**meta("encode.py", sys.argv[1:]), "zlib": zlib.ZLIB_RUNTIME_VERSION, "png": {}, "mp4": {}}
    for name, pixels in images.items():
        image = Image.fromarray(pixels)
        for how, fn in hows:
            ms, size = best_ms(lambda fn=fn, image=image: fn(image))
            results["png"][f"{name} {how}"] = {"ms": ms, "bytes": size}
    frame = np.asarray(input_image(832, 480).convert("RGB"))
    videos = {"noise": rng.integers(0, 256, (81, 480, 832, 3), dtype=np.uint8),
              "smooth": np.stack([np.roll(frame, 4 * i, axis=1) for i in range(81)])}
    for name, frames in videos.items():
        for preset in ("veryfast", "superfast", "ultrafast"):
            ms, size = best_ms(lambda frames=frames, preset=preset: frames_to_mp4(frames, 16, preset=preset))
            results["mp4"][f"{name} {preset}"] = {"ms": ms, "bytes": size}
    for kind in ("png", "mp4"):
        for name, row in results[kind].items():
            print(f"{kind} {name:24s} {row['ms']:8.1f} ms {row['bytes']:>10,} bytes")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
