"""Media in and out: safe decoding of input images, MP4/PNG encoding, data URIs, video sizing.

Input images come from untrusted requests as an http(s) URL, a data URI or bare base64.
URLs are fetched through runpod's SSRF-safe `safe_get` (public addresses only, re-checked on
every redirect, pinned against DNS rebinding) under a hard overall deadline and a byte cap
enforced while streaming; decoding is limited to common raster formats and a pixel budget
checked from the header before any pixel is decoded. Every refusal is an `InputError` whose
one sentence names the field, what was received (cut short) and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import queue
import re
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps

from schemas import InputError, shorten

# Formats PIL may decode. Leaves out EPS/PS (PIL hands those to Ghostscript) and exotic codecs.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_WORDS = "PNG, JPEG, WebP, GIF, BMP or TIFF image"
MAX_URL_CHARS = 16_384  # pre-signed S3 URLs are 1-2k characters; anything longer is not an address
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_CHUNK = 64 * 1024
# Something a user meant as a file path ("/etc/passwd", "./cat.png", "~/a.jpg", "C:\\x.png").
_PATH = re.compile(r"^(~|\.{1,2}|[A-Za-z]:)?[/\\][\w.\-/\\ ]*$")
_WHITESPACE = re.compile(r"\s+")
_SOURCES = "an http(s) URL, a data URI or base64 image data"


def load_image_input(value: str, field: str, *, max_bytes: int, max_pixels: int, timeout_s: float) -> Image.Image:
    """Decode an http(s) URL, data URI or bare base64 string into an RGB image."""
    text = value.strip()
    scheme = _SCHEME.match(text)
    kind = scheme.group(1).lower() if scheme else None
    if kind in ("http", "https"):
        if len(text) > MAX_URL_CHARS:
            raise InputError(f"Field '{field}' must be a URL of at most {MAX_URL_CHARS:,} characters, got "
                             f"{shorten(text)}.")
        data = fetch_url(text, field, max_bytes=max_bytes, timeout_s=timeout_s)
    elif kind == "data":
        header, _, payload = text.partition(",")
        if not header.lower().endswith(";base64"):
            raise InputError(f"Field '{field}' is a data URI that is not base64-encoded, {shorten(header)}; "
                             f"send data:image/...;base64,<data>.")
        data = _b64decode(payload, field, max_bytes)
        if data is None:
            raise InputError(f"Field '{field}' is a data URI whose data is not valid base64, {shorten(text)}; "
                             f"send data:image/...;base64,<data>.")
    elif kind is None or len(kind) == 1:  # bare base64, or a path (a one-letter "scheme" is a drive: C:\x.png)
        # Base64 never holds a space (words would otherwise decode to garbage bytes).
        data = None if " " in text else _b64decode(text, field, max_bytes)
        if _PATH.match(text) and (data is None or not _looks_like_image(data)):
            raise InputError(f"Field '{field}' must be {_SOURCES}, got {shorten(value)}; local file paths are "
                             f"not accepted.")
        if data is None:
            raise InputError(f"Field '{field}' must be {_SOURCES}, got {shorten(value)}, which is none of these.")
    else:
        raise InputError(f"Field '{field}' must be {_SOURCES}, got {shorten(value)}; '{kind[:20]}:' URLs are "
                         f"not accepted.")
    return decode_image(data, field, max_pixels=max_pixels)


def _looks_like_image(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
        return True
    except Image.DecompressionBombError:
        return True  # an image header, of too many pixels: decode_image says so
    except Exception:  # noqa: BLE001 - any failure means "not an image header"
        return False


def _b64decode(payload: str, field: str, max_bytes: int) -> bytes | None:
    """Base64 text -> bytes, refusing more than max_bytes before decoding; None when it is not base64."""
    compact = _WHITESPACE.sub("", payload)
    size = len(compact) * 3 // 4
    if size > max_bytes:
        raise InputError(f"Field '{field}' carries {size:,} bytes of base64 data, {shorten(compact, 40)}; at most "
                         f"{max_bytes:,} bytes are accepted (MAX_INPUT_IMAGE_BYTES).")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def fetch_url(url: str, field: str, *, max_bytes: int, timeout_s: float) -> bytes:
    """Download a user-supplied image URL into memory through `stream_url` (SSRF-safe, deadline, byte cap)."""
    timeout_s = max(timeout_s, 0.01)
    shown = shorten(url, 100)
    words = Refusals(
        start=f"Field '{field}' points to {shown}, which", thing="image",
        cap=f"at most {max_bytes:,} bytes are accepted (MAX_INPUT_IMAGE_BYTES)",
        slow=(f"Field '{field}' points to {shown}, which did not finish downloading within {timeout_s:g} s; images "
              f"must download within FETCH_TIMEOUT_S={timeout_s:g} s or be sent as base64."),
        no_host=f"Field '{field}' must be an http(s) URL with a host name, got {shown}.")
    body = bytearray()
    stream_url(url, body.extend, max_bytes=max_bytes, timeout_s=timeout_s, words=words)
    return bytes(body)


@dataclass(frozen=True)
class Refusals:
    """The wording of one download's refusals, so that image_url and LoRA files share `stream_url`."""

    start: str  # how each sentence begins: "Field 'image_url' points to 'https://...', which"
    thing: str  # what is downloaded: "image" or "file"
    cap: str  # the byte cap: "at most 1,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES)"
    slow: str  # the whole sentence for a download that misses its deadline
    no_host: str  # the whole sentence for a URL (or redirect) without a host name
    allowed: str = "only public http(s) addresses are allowed"


def stream_url(url: str, write: Callable[[bytes], object], *, max_bytes: int, timeout_s: float, words: Refusals,
               chunk_size: int = _CHUNK) -> None:
    """Stream a user-supplied URL to `write` with SSRF protection, a hard deadline and a streaming byte cap.

    Runpod's `safe_get` allows public addresses only, checked again on every redirect and
    pinned against DNS rebinding. The download runs in a daemon thread so that the deadline
    holds whatever the server does (sleeps, trickles headers or body a byte at a time,
    redirects slowly): at the deadline the caller gets `words.slow` and the thread stops at
    its next read, which the socket timeout bounds; `write` is not called after that read.
    Every refusal is an InputError of one sentence from `words`.
    """
    timeout_s = max(timeout_s, 0.01)
    outcome: queue.SimpleQueue = queue.SimpleQueue()
    cancelled = threading.Event()

    def run() -> None:
        try:
            _stream(url, write, max_bytes, timeout_s, words, chunk_size, cancelled)
            outcome.put(None)
        except InputError as err:
            outcome.put(err)
        except Exception as err:  # noqa: BLE001 - odd URLs (bad port, IDNA, ...) become a refusal, not a crash
            outcome.put(InputError(f"{words.start} cannot be fetched ({type(err).__name__}); send a reachable "
                                   f"public http(s) URL."))

    threading.Thread(target=run, name="fetch-url", daemon=True).start()
    try:
        result = outcome.get(timeout=timeout_s)
    except queue.Empty:
        cancelled.set()
        raise InputError(words.slow) from None
    if isinstance(result, InputError):
        raise InputError(str(result)) from None


def _stream(url: str, write: Callable[[bytes], object], max_bytes: int, timeout_s: float, words: Refusals,
            chunk_size: int, cancelled: threading.Event) -> None:
    import requests
    import urllib3
    from runpod.serverless.utils.rp_ssrf import SSRFError, safe_get

    try:
        response = safe_get(url, stream=True, timeout=(min(timeout_s, 10.0), min(timeout_s, 60.0)),
                            max_bytes=max_bytes)
    except SSRFError as err:
        raise InputError(_refusal(str(err), url, words)) from None
    except requests.Timeout:
        raise InputError(words.slow) from None
    except requests.RequestException as err:
        raise InputError(f"{words.start} cannot be fetched ({type(err).__name__}); send a reachable public http(s) "
                         f"URL.") from None
    with response:
        if response.status_code != 200:
            raise InputError(f"{words.start} answered HTTP {response.status_code}; the {words.thing} must be served "
                             f"with status 200.")
        received = 0
        try:
            while not cancelled.is_set():
                # read1: at most one socket read per call, so a trickling server cannot keep one
                # call busy past the deadline; decoded output is capped at chunk_size (no gzip bomb).
                chunk = response.raw.read1(chunk_size, decode_content=True)
                if not chunk or cancelled.is_set():
                    break
                received += len(chunk)
                if received > max_bytes:
                    raise InputError(f"{words.start} sent more than {max_bytes:,} bytes; {words.cap}.")
                write(chunk)
        except (urllib3.exceptions.ReadTimeoutError, requests.Timeout):
            raise InputError(words.slow) from None
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as err:
            raise InputError(f"{words.start} broke off while sending the {words.thing} ({type(err).__name__}); "
                             f"send a URL that serves the whole {words.thing}.") from None


def _refusal(message: str, url: str, words: Refusals) -> str:
    """One sentence for an SSRFError of runpod's safe_get (whose own text repeats the whole URL)."""
    start, allowed = words.start, words.allowed
    host = (urlparse(url).hostname or "").lower()
    if m := re.match(r"host (['\"])(.*)\1 resolves to non-public address (\S+)$", message):
        verb = "resolves" if m.group(2).lower() == host else f"redirects to {shorten(m.group(2), 40)}, which resolves"
        return f"{start} {verb} to the non-public address {m.group(3)}; {allowed}."
    if m := re.match(r"could not resolve host (['\"])(.*)\1", message):
        what = "host" if m.group(2).lower() == host else f"redirect target {shorten(m.group(2), 40)}"
        return f"{start} names a {what} that does not resolve; {allowed}."
    if m := re.match(r"download exceeds size cap: (\d+) > ", message):
        return f"{start} announces {int(m.group(1)):,} bytes; {words.cap}."
    if m := re.match(r"exceeded maximum redirects \((\d+)\)", message):
        return f"{start} redirects more than {m.group(1)} times; at most {m.group(1)} redirects are followed."
    if m := re.match(r"blocked URL scheme (['\"])(.*)\1", message):
        return f"{start} redirects to a {shorten(m.group(2), 20)} URL; {allowed}."
    if message.startswith("refusing to fetch"):
        return (f"{start} the worker's HTTP proxy settings would fetch without SSRF protection; unset the proxy "
                f"for this host or set RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=true.")
    if message.startswith("URL has no host"):
        return words.no_host
    if message.startswith("redirect without Location"):
        return (f"{start} answered a redirect without a Location header; the {words.thing} must be served with "
                f"status 200.")
    return f"{start} cannot be fetched ({shorten(message.split(': http')[0])}); {allowed}."


def decode_image(data: bytes, field: str, *, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB, refusing non-images, truncated files and decompression bombs."""
    if not data:
        raise InputError(f"Field '{field}' holds no data; send a PNG, JPEG or WebP image.")
    head = "".join(chr(b) if 32 <= b < 127 else "." for b in data[:16])  # printable ASCII only
    try:
        with warnings.catch_warnings():
            # The pixel budget below replaces PIL's warning; PIL's hard limit (2x its default) still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise InputError(f"Field '{field}' is an image of {size}; at most {max_pixels:,} pixels are accepted "
                         f"(MAX_INPUT_IMAGE_PIXELS).") from None
    except Exception:  # noqa: BLE001 - PIL plugins raise many types (struct.error, KeyError, ...) on hostile bytes
        raise InputError(f"Field '{field}' is not a decodable image (unrecognized data starting {head!r}); "
                         f"send a {FORMAT_WORDS}.") from None
    pixels = image.width * image.height
    if pixels > max_pixels:  # checked from the header, before decoding a single pixel
        raise InputError(f"Field '{field}' is a {image.width}x{image.height} image ({pixels:,} pixels); at most "
                         f"{max_pixels:,} pixels are accepted (MAX_INPUT_IMAGE_PIXELS).")
    try:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception:  # noqa: BLE001 - as above, for the pixel data (MemoryError included)
        raise InputError(f"Field '{field}' is not a decodable image (truncated or corrupt data "
                         f"starting {head!r}); send a {FORMAT_WORDS}.") from None


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


def frames_to_mp4(frames: np.ndarray, fps: int, crf: int = 18, preset: str = "veryfast") -> bytes:
    """Encode (F, H, W, 3) frames as H.264 yuv420p MP4 with the moov atom first.

    Exactly one video frame per input frame at a constant `fps`; '+faststart' moves the index
    to the front so browsers play the file while it downloads. H and W must be even. CRF sets
    the quality; the x264 preset trades encode time for file size (MP4_PRESET).
    """
    frames = to_uint8(frames)
    _, height, width, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="mp4-") as tmp:
        path = os.path.join(tmp, "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=2, ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-preset", preset, "-movflags", "+faststart"],
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
