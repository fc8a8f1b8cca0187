"""Media in and out: safe decoding of input images, MP4/PNG encoding, data URIs, video sizing.

Input images come from untrusted requests as an http(s) URL, a data URI or bare base64.
URLs are fetched through runpod's SSRF-safe `safe_get` (public addresses only, re-checked on
every redirect, pinned against DNS rebinding) with a deadline and a byte cap enforced while
streaming; decoding is limited to common raster formats and a pixel budget checked from the
header before any pixel is decoded. Every refusal is an `InputError` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import tempfile
import time
import warnings

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import InputError, shorten

# Formats PIL may decode. Leaves out EPS/PS (PIL hands those to Ghostscript) and exotic codecs.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CHUNK = 64 * 1024
# Something a user meant as a file path ("/etc/passwd", "./cat.png", "~/a.jpg", "C:\\x.png").
_PATH = re.compile(r"^(~|\.{1,2}|[A-Za-z]:)?[/\\][\w.\-/\\ ]*$")


def load_image_input(value: str, field: str, *, max_bytes: int, max_pixels: int, timeout_s: float) -> Image.Image:
    """Decode an http(s) URL, data URI or bare base64 string into an RGB image."""
    text = value.strip()
    scheme = _SCHEME.match(text)
    kind = scheme.group(1).lower() if scheme else None
    if kind in ("http", "https"):
        data = fetch_url(text, field, max_bytes=max_bytes, timeout_s=timeout_s)
    elif kind == "data":
        header, _, payload = text.partition(",")
        if not header.lower().endswith(";base64"):
            raise InputError(f"Field '{field}' is a data URI that is not base64-encoded ({shorten(header)}); "
                             f"send data:image/...;base64,<data>.")
        data = _b64decode(payload, field, max_bytes)
    elif kind is None:
        data = _b64decode(text, field, max_bytes)
        if _PATH.match(text) and not _looks_like_image(data):
            raise InputError(f"Field '{field}' must be an http(s) URL, a data URI or base64 image data, got "
                             f"{shorten(value)}; local file paths are not accepted.")
    else:
        raise InputError(f"Field '{field}' must be an http(s) URL, a data URI or base64 image data, got "
                         f"{shorten(value)}; other URL schemes are not accepted.")
    return decode_image(data, field, max_pixels=max_pixels)


def _looks_like_image(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not an image header"
        return False


def _b64decode(payload: str, field: str, max_bytes: int) -> bytes:
    compact = re.sub(r"\s+", "", payload)
    if len(compact) * 3 // 4 > max_bytes:
        raise InputError(f"Field '{field}' carries {len(compact) * 3 // 4:,} bytes of base64 data; "
                         f"at most {max_bytes:,} bytes are accepted.")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"Field '{field}' must be an http(s) URL, a data URI or base64 image data, got "
                         f"{shorten(payload)}; local file paths are not accepted.") from None


def fetch_url(url: str, field: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """Download a user-supplied URL with SSRF protection, a deadline and a streaming byte cap."""
    import requests
    from runpod.serverless.utils.rp_ssrf import SSRFError, safe_get

    shown = shorten(url, 100)
    deadline = time.monotonic() + timeout_s
    try:
        response = safe_get(url, stream=True, timeout=(min(timeout_s, 10.0), timeout_s), max_bytes=max_bytes)
    except SSRFError as err:
        message = str(err)
        if "size cap" in message:
            raise InputError(f"Field '{field}' points to a file over {max_bytes:,} bytes ({shown}).") from None
        raise InputError(f"Field '{field}' cannot be fetched: {message.split(': http')[0]}; only public http(s) "
                         f"addresses are allowed ({shown}).") from None
    except requests.Timeout:
        raise InputError(f"Field '{field}' did not answer within {timeout_s:g} s ({shown}).") from None
    except requests.RequestException as err:
        raise InputError(f"Field '{field}' could not be fetched ({type(err).__name__}) from {shown}.") from None
    with response:
        if response.status_code != 200:
            raise InputError(f"Field '{field}' answered HTTP {response.status_code} ({shown}); it must serve the "
                             f"image with status 200.")
        body = bytearray()
        try:
            for chunk in response.iter_content(chunk_size=_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise InputError(f"Field '{field}' sent more than {max_bytes:,} bytes ({shown}); "
                                     f"images up to {max_bytes:,} bytes are accepted.")
                if time.monotonic() > deadline:
                    raise InputError(f"Field '{field}' took longer than {timeout_s:g} s to download ({shown}).")
        except requests.RequestException as err:
            raise InputError(f"Field '{field}' broke off while downloading ({type(err).__name__}) "
                             f"from {shown}.") from None
    return bytes(body)


def decode_image(data: bytes, field: str, *, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB, refusing non-images, truncated files and decompression bombs."""
    if not data:
        raise InputError(f"Field '{field}' holds no data; send a PNG, JPEG or WebP image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
            pixels = image.width * image.height
            if pixels > max_pixels:  # checked from the header, before decoding a single pixel
                raise InputError(f"Field '{field}' is a {image.width}x{image.height} image ({pixels:,} pixels); "
                                 f"at most {max_pixels:,} pixels are accepted.")
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        head = "".join(ch if ch.isprintable() else "." for ch in data[:16].decode("latin-1"))
        detail = "truncated or corrupt" if isinstance(err, OSError) and "truncat" in str(err) else "unrecognized"
        raise InputError(f"Field '{field}' is not a decodable image ({detail} data starting {head!r}); "
                         f"send a PNG, JPEG, WebP, GIF, BMP or TIFF image.") from None


def fit_area(width: int, height: int, area: int, multiple: int) -> tuple[int, int]:
    """Size with the aspect ratio of width x height and about `area` pixels, each side a multiple.

    This is the recipe of diffusers' Wan I2V example (1280x720 -> 832x464 inside 480x832).
    """
    aspect = height / width
    out_h = round(math.sqrt(area * aspect)) // multiple * multiple
    out_w = round(math.sqrt(area / aspect)) // multiple * multiple
    return out_w, out_h


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline frames in [0, 1] float -> uint8 RGB."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def frames_to_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """Encode (F, H, W, 3) frames as H.264 yuv420p MP4 with the moov atom first.

    Exactly one video frame per input frame at a constant `fps`; '+faststart' moves the index
    to the front so browsers play the file while it downloads. H and W must be even.
    """
    frames = to_uint8(frames)
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=2, ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-preset", "medium", "-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as fh:
            return fh.read()


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
