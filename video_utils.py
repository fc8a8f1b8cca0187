"""Media in and out: safe decoding of input images, scaling them to a job's size, PNG/MP4 encoding, data URIs.

Input images come from untrusted requests as an http(s) URL (fetched by fetch.py), a data URI
or bare base64; decoding is limited to common raster formats and a pixel budget checked from
the header before any pixel is decoded. Every refusal is an `InputError` whose one sentence
names the field, what was received (cut short) and what is allowed.
"""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures
import errno
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
import zlib

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps

from errors import InputError, ResourceError, shorten
from fetch import fetch_url
from folders import folder_fault
from inline import video_bytes

log = logging.getLogger("worker")

# Formats PIL may decode. Leaves out EPS/PS (PIL hands those to Ghostscript) and exotic codecs.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_WORDS = "PNG, JPEG, WebP, GIF, BMP or TIFF image"
MAX_URL_CHARS = 16_384  # pre-signed S3 URLs are 1-2k characters; anything longer is not an address
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
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


def decode_image(data: bytes, field: str, *, max_pixels: int) -> Image.Image:
    """Decode image bytes to RGB, refusing non-images, truncated files and decompression bombs."""
    if not data:
        raise InputError(f"Field '{field}' holds no data; send a {FORMAT_WORDS}.")
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


def cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale `image` to fill width x height and center-crop the overflow: never stretched."""
    return ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG. zlib's run-length strategy: for generated pictures about as small as the default
    strategy's files, in about half the time (benchmarks/encode.py)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class Mp4Stream:
    """An H.264 yuv420p MP4 encoded while its frames arrive, so that x264 works while the VAE decodes.

    Exactly one video frame per input frame at a constant `fps`; '+faststart' moves the index to
    the front so browsers play the file while it downloads. H and W must be even. CRF sets the
    quality; the x264 preset trades encode time for file size (MP4_PRESET). ffmpeg starts with the
    first frames and writes into a temp folder of this process (see `remove_leftovers`); leaving the
    `with` block without `finish()` stops it and keeps nothing. ffmpeg runs here rather than through
    imageio-ffmpeg's writer, which ignores ffmpeg's exit status and lets its stderr go to the log: a
    failure then reads as "Broken pipe" or, at the end of the file, as a truncated MP4.
    """

    def __init__(self, width: int, height: int, fps: int, crf: int = 18, preset: str = "veryfast") -> None:
        self._tmp = temp_folder()
        self._path = os.path.join(self._tmp.name, "video.mp4")
        # imageio-ffmpeg's command for these options, so the bytes are the ones it made.
        self._cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
                     "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an",
                     "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error", "-crf", str(crf), "-preset", preset,
                     "-movflags", "+faststart", self._path]
        self._ffmpeg: subprocess.Popen | None = None
        self._said: collections.deque[str] = collections.deque(maxlen=8)  # ffmpeg's last lines on stderr
        self._reader: threading.Thread | None = None
        # Frames go to ffmpeg from a thread: the caller (the VAE's decode loop) goes on while ffmpeg reads them.
        self._sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp4")
        self._sent: list[concurrent.futures.Future] = []

    def write(self, frames: np.ndarray) -> None:
        """Queue (F, H, W, 3) uint8 RGB frames behind those written before."""
        if frames.dtype != np.uint8:  # ffmpeg would read float bytes as pixels
            raise ValueError(f"MP4 frames must be uint8, got {frames.dtype}")
        self._sent.append(self._sender.submit(self._send, frames))

    def _send(self, frames: np.ndarray) -> None:
        if self._ffmpeg is None:
            self._ffmpeg = subprocess.Popen(self._cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
            self._reader = threading.Thread(target=self._read_stderr, name="mp4-stderr", daemon=True)
            self._reader.start()
        for frame in frames:
            self._ffmpeg.stdin.write(np.ascontiguousarray(frame).data)
        self._ffmpeg.stdin.flush()  # x264 gets these frames now, while the VAE decodes the next

    def _read_stderr(self) -> None:
        """Keep ffmpeg's last words (it says why it stopped); read as they come so that its pipe never fills."""
        for line in self._ffmpeg.stderr:
            self._said.append(line.decode(errors="replace").strip())

    def finish(self) -> bytes:
        """Wait for the frames to be encoded; the MP4's bytes."""
        broken: OSError | None = None
        for sent in self._sent:
            try:
                sent.result()
            except OSError as err:  # ffmpeg stopped reading (or never started): its exit says why
                broken = broken or err
        if self._ffmpeg is None:
            if broken is not None:
                raise OSError(f"the MP4 encoder (ffmpeg) could not start: {broken}") from broken
            raise ValueError("an MP4 needs at least one frame")
        self._stop(kill=False)  # ffmpeg encodes the frames it still holds and writes the index
        if broken is not None or self._ffmpeg.returncode != 0:
            raise self._failure(broken)
        try:
            with open(self._path, "rb") as fh:
                return fh.read()
        except OSError as err:
            raise self._failure(err) from err

    def _stop(self, kill: bool) -> None:
        if kill and self._ffmpeg.poll() is None:
            self._ffmpeg.kill()
        try:
            self._ffmpeg.stdin.close()
        except OSError:  # already broken: ffmpeg has gone
            pass
        self._ffmpeg.wait()
        self._reader.join()
        self._ffmpeg.stderr.close()

    def _failure(self, err: OSError | None) -> Exception:
        return encoder_failure(list(self._said), self._ffmpeg.returncode, err)

    def __enter__(self) -> Mp4Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sender.shutdown(wait=True, cancel_futures=True)
        if self._ffmpeg is not None and self._reader is not None:
            self._stop(kill=True)  # after finish() it has ended; otherwise its MP4 is not wanted
        self._tmp.cleanup()


# ------------------------------------------------------------------------------------ temp folders
_LEFTOVER = re.compile(r"^mp4-(\d+)-")  # the temp folders of temp_folder(): mp4-<pid>-<random>


def temp_folder() -> tempfile.TemporaryDirectory:
    """A temp folder for one MP4, named by this process's id so that a later start can tell a dead worker's."""
    try:
        return tempfile.TemporaryDirectory(prefix=f"mp4-{os.getpid()}-")
    except OSError as err:
        if fault := temp_fault(err):
            raise ResourceError(f"The MP4 could not be written: {fault}.") from None
        raise


def temp_fault(err: OSError) -> str | None:
    return folder_fault(err, "TMPDIR", tempfile.gettempdir())


def remove_leftovers(folder: str | None = None) -> list[str]:
    """Delete the MP4 temp folders of worker processes that no longer run (killed mid-job); returns their paths.

    Call once at start-up, before any job: a folder named with this process's own id is then a previous
    worker's (a restarted container gives its worker the same pid). Folders of running processes (another
    worker sharing the temp folder) stay. The worker writes nothing else into the temp folder: the default
    LoRA cache there is a cache, kept and bounded by LORA_CACHE_GB.
    """
    folder = folder or tempfile.gettempdir()
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no temp folder to clean: check_folders reports it
        return []
    removed = []
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not _running(int(match[1])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        log.info("removed %d temp folder(s) left by a stopped worker: %s", len(removed), ", ".join(removed))
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def encoder_failure(said: list[str], code: int | None, err: OSError | None) -> Exception:
    """The error for an MP4 that ffmpeg could not make, from its last lines on stderr, its exit status and the
    OSError met on our side: a full or unwritable TMPDIR is a ResourceError naming it."""
    text = " ".join(said)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        err = OSError(errno.ENOSPC, "No space left on device")
    if err is not None and (fault := temp_fault(err)):
        return ResourceError(f"The MP4 could not be written: {fault}.")
    if code is not None and code < 0:
        return OSError(f"the MP4 encoder (ffmpeg) was stopped by {signal.Signals(-code).name}")
    detail = said[-1] if said else (str(err) if err else f"exit status {code}")
    return OSError(f"the MP4 encoder (ffmpeg) failed: {detail}")


def shrink_mp4(data: bytes, max_bytes: int, preset: str = "veryfast") -> tuple[bytes, int]:
    """The MP4 re-encoded at the average bitrate that fits it into `max_bytes`, and that bitrate in kbit/s.

    x264 holds an average rate under a VBV cap of one second (the clip's length when shorter), a little over it at
    times and more on a short noisy clip: a result still over gets one more try, its rate lowered in proportion.
    The second try is returned even when it is over (the caller says so). Every frame and the frame rate are kept.
    """
    with temp_folder() as folder:
        source = os.path.join(folder, "video.mp4")
        try:
            with open(source, "wb") as fh:
                fh.write(data)
        except OSError as err:
            raise encoder_failure([], None, err) from err
        frames, seconds = imageio_ffmpeg.count_frames_and_secs(source)
        kbps = max(1, int(video_bytes(max_bytes, frames) * 8 * 0.9 / seconds / 1000))
        target = os.path.join(folder, "smaller.mp4")
        mp4 = _reencode(source, target, kbps, min(seconds, 1.0), preset)
        if len(mp4) > max_bytes:
            kbps = max(1, int(kbps * max_bytes / len(mp4) * 0.8))
            mp4 = _reencode(source, target, kbps, min(seconds, 1.0), preset)
        return mp4, kbps


def _reencode(source: str, target: str, kbps: int, buffer_s: float, preset: str) -> bytes:
    rate = ["-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{max(1, int(kbps * buffer_s))}k"]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", source, "-an", "-vcodec", "libx264",
           "-pix_fmt", "yuv420p", *rate, "-preset", preset, "-fps_mode", "passthrough", "-movflags", "+faststart",
           target]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    said = done.stderr.decode(errors="replace").splitlines()[-8:]
    if done.returncode != 0:
        raise encoder_failure(said, done.returncode, None)
    try:
        with open(target, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise encoder_failure(said, done.returncode, err) from err


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """A JPEG of `image` (4:2:0, optimized Huffman tables): the smaller form of a result too large as PNG."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()
