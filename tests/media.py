"""Test helpers that read media back the way a user's player would: MP4 box order and full decoding."""

from __future__ import annotations

import os
import tempfile

import imageio_ffmpeg
import numpy as np


def mp4_top_level_boxes(data: bytes) -> list[str]:
    """Names of the MP4's top-level boxes in file order (e.g. ftyp, moov, mdat)."""
    names, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        name = data[pos + 4:pos + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        names.append(name)
        pos += size
    return names


def probe_mp4(data: bytes) -> dict:
    """Decode an MP4 fully: frame count, fps, size, codec, pixel format and box order."""
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        with open(path, "wb") as fh:
            fh.write(data)
        reader = imageio_ffmpeg.read_frames(path)
        meta = reader.__next__()
        frames = [np.frombuffer(f, np.uint8) for f in reader]
    width, height = meta["size"]
    boxes = mp4_top_level_boxes(data)
    return {
        "frames": len(frames), "fps": meta["fps"], "width": width, "height": height,
        "codec": meta["codec"], "pix_fmt": meta["pix_fmt"], "boxes": boxes,
        "pixels": np.stack(frames).reshape(len(frames), height, width, 3) if frames else None,
    }


def frames_to_mp4(frames: np.ndarray, fps: int, crf: int = 18, preset: str = "veryfast") -> bytes:
    """(F, H, W, 3) uint8 frames as an MP4 at once, through the worker's own encoder (video_utils.Mp4Stream)."""
    from video_utils import Mp4Stream

    with Mp4Stream(frames.shape[2], frames.shape[1], fps, crf, preset) as mp4:
        mp4.write(frames)
        return mp4.finish()
