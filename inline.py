"""The inline limit: how large a result returned as base64 may be, and the words for it.

A result returned inline (no bucket, or output 'base64') must fit MAX_INLINE_MB as base64 (RunPod
carries 10 MB on /run, 20 MB on /runsync). The job check refuses a request that could not fit at a
quality worth sending; storage.py shrinks a finished result that does not fit (an MP4 re-encoded at
a lower bitrate, images as JPEG).
"""

from __future__ import annotations

# What can be decided before generating: a result that would have fewer bits per pixel than these cannot be
# shrunk to fit at a quality worth sending.
MIN_IMAGE_BITS_PER_PIXEL = 1.0  # about a detailed picture as JPEG at quality 75
MIN_VIDEO_BITS_PER_PIXEL = 0.05  # of each frame: below it H.264 smears, and x264 overshoots so low a rate
MP4_FIXED_BYTES = 1_000  # an MP4's boxes besides its frames (ftyp, moov)
MP4_FRAME_BYTES = 40  # per frame: its index entries and the least x264 spends on one


def inline_bytes(chars: int, mime: str) -> int:
    """The most bytes a data URI of `mime` carries within `chars` characters (base64: 3 bytes in 4 characters)."""
    return max(0, chars - len(f"data:{mime};base64,")) // 4 * 3


def video_bytes(mp4_bytes: int, frames: int) -> int:
    """What an MP4 of `mp4_bytes` has for its H.264 frames, once its boxes are counted."""
    return max(0, mp4_bytes - MP4_FIXED_BYTES - MP4_FRAME_BYTES * frames)


def inline_limit(chars: int) -> str:
    """The limit that applies to inline results, as words: its size, its setting and RunPod's caps."""
    return (f"the {chars:,}-character inline limit (MAX_INLINE_MB={chars / 1e6:g}; RunPod carries 10 MB on /run and "
            f"20 MB on /runsync)")


def inline_fix(bucket: object | None) -> str:
    """How to receive a result too large to return inline."""
    return ("ask for output 'auto' to receive it as a URL from the configured bucket" if bucket else
            "configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to receive it "
            "as a URL")
