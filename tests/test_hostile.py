"""Hostile input: the worker never reads local files, reaches internal addresses, hangs or runs out
of memory because of a request. Every refusal is one sentence naming the field, what was received
(cut short) and what is allowed, and the worker keeps serving.

Three layers:
- a table of hostile requests through the real local API server (`handler.py --rp_serve_api`),
  one server with SSRF protection on (the default) and one that allows private addresses so
  that misbehaving HTTP servers on 127.0.0.1 can stand in for hostile public hosts;
- property-based fuzzing of `validate_input` and of the in-process handler;
- unit tests of `fetch_url` / `decode_image` against misbehaving servers.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gzip
import io
import json
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import pytest
from conftest import png_b64, png_image
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from pytest_httpserver import HTTPServer
from runpod.serverless.utils import rp_ssrf
from werkzeug import Request, Response

from fetch import fetch_url
from fields import coerce
from schemas import INPUT_SCHEMA, SCHEDULERS, ImageJob, InputError, VideoJob, validate_input
from video_utils import decode_image

OPEN_ENV = {"RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "true", "FETCH_TIMEOUT_S": "3", "MAX_INPUT_IMAGE_BYTES": "5000000"}
FETCH_TIMEOUT_S = 3
VIDEO = {"mode": "video", "prompt": "a cat turns its head", "image_url": png_b64(48, 32), "height": 64, "width": 64,
         "num_frames": 5, "num_inference_steps": 2, "seed": 1}
FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF image"
PUBLIC_ONLY = "only public http(s) addresses are allowed."
SOURCES = "must be an http(s) URL, a data URI or base64 image data, got"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    png_image(64, 64).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bomb(side: int) -> bytes:
    """A side x side bilevel PNG of zeros: a few KB on the wire, side**2 pixels once decoded."""
    return png_bytes(Image.new("1", (side, side)))


def png_header_only(width: int, height: int) -> bytes:
    """A width x height RGB PNG with an empty IDAT: all a decoder needs to size it, no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Misbehaving HTTP servers on 127.0.0.1
# ---------------------------------------------------------------------------------------------
def _slow(request: Request) -> Response:
    time.sleep(FETCH_TIMEOUT_S + 5)  # answers long after the deadline
    return Response(b"late", content_type="image/png")


def _trickle(request: Request) -> Response:
    def body() -> Iterator[bytes]:
        for _ in range(100):  # one byte every 0.2 s: each read is quick, the whole never ends in time
            yield b"\x89"
            time.sleep(0.2)
    # A declared length means no chunked encoding: a reader that fills a 64 KB buffer would block here.
    return Response(body(), headers={"Content-Length": "1000000", "Content-Type": "image/png"})


def _endless(request: Request) -> Response:
    def body() -> Iterator[bytes]:
        block = b"\0" * 65536
        for _ in range(3000):  # ~200 MB, stops early once the client hangs up
            yield block
    return Response(body(), content_type="image/png")  # no Content-Length: chunked, ends when it likes


def _announces_huge(request: Request) -> Response:
    return Response(iter([b"\0" * 1024]), headers={"Content-Length": "6000000", "Content-Type": "image/png"})


def _gzip_bomb() -> bytes:
    return gzip.compress(b"\0" * 60_000_000, compresslevel=9)  # ~60 KB on the wire


@pytest.fixture(scope="module")
def web() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.start()
    base = server.url_for("").rstrip("/")
    server.expect_request("/ok.png").respond_with_data(png_bytes(png_image(48, 32)), content_type="image/png")
    server.expect_request("/bomb.png").respond_with_data(png_bomb(10_000), content_type="image/png")
    server.expect_request("/page.png").respond_with_data(
        "<!DOCTYPE html><html><body>Not an image</body></html>", content_type="image/png")
    server.expect_request("/truncated.jpg").respond_with_data(jpeg_bytes()[:1500], content_type="image/jpeg")
    server.expect_request("/missing.png").respond_with_data("not found", status=404)
    server.expect_request("/slow.png").respond_with_handler(_slow)
    server.expect_request("/trickle.png").respond_with_handler(_trickle)
    server.expect_request("/endless.png").respond_with_handler(_endless)
    server.expect_request("/huge.png").respond_with_handler(_announces_huge)
    server.expect_request("/gzip-bomb.png").respond_with_data(
        _gzip_bomb(), headers={"Content-Encoding": "gzip"}, content_type="image/png")
    server.expect_request("/to-loopback").respond_with_data("", status=302, headers={"Location": f"{base}/ok.png"})
    server.expect_request("/to-ok").respond_with_data("", status=302, headers={"Location": "/ok.png"})
    server.expect_request("/loop").respond_with_data("", status=302, headers={"Location": "/loop"})
    server.expect_request("/to-metadata").respond_with_data(
        "", status=302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
    server.expect_request("/to-file").respond_with_data("", status=302, headers={"Location": "file:///etc/passwd"})
    yield server
    server.clear()
    server.stop()


class RawServer:
    """A bare TCP server for what HTTP frameworks won't do: endless bodies without any length,
    headers sent one byte at a time. `behave(conn, stop)` writes the response."""

    def __init__(self, behave: Callable[[socket.socket, threading.Event], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/image.png"
        self.stop = threading.Event()
        self.behave = behave
        self.acceptor = threading.Thread(target=self._serve, daemon=True)
        self.acceptor.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            try:
                self.behave(conn, self.stop)
            except OSError:  # the client hung up: what we want
                pass

    def close(self) -> None:
        self.stop.set()
        self.acceptor.join(timeout=2)
        self.sock.close()


def _endless_without_length(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
    _endless_body(conn, stop)


def _endless_body(conn: socket.socket, stop: threading.Event) -> None:
    block = b"\0" * 65536
    for _ in range(3000):
        if stop.is_set():
            return
        conn.sendall(block)


def _claims_1000_bytes_sends_endless(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n")
    _endless_body(conn, stop)


def _claims_1000000_bytes_sends_100(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n" + b"\0" * 100)


def _trickled_headers(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(200):  # one header byte every 0.3 s: every read succeeds, the headers never end
        if stop.is_set():
            return
        conn.sendall(b"a")
        time.sleep(0.3)


@pytest.fixture()
def raw_server() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(behave: Callable[[socket.socket, threading.Event], None]) -> RawServer:
        servers.append(RawServer(behave))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# ---------------------------------------------------------------------------------------------
# 1. Hostile requests through the real local API server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_api(start_api):
    """A server that may fetch from private addresses (so 127.0.0.1 can play a hostile public host),
    with a 3 s fetch deadline and a 5 MB input cap (and one torch thread, see one_torch_thread)."""
    return start_api({**OPEN_ENV, "OMP_NUM_THREADS": "1"})


BIG_B64 = "A" * 50_000_000  # 50 MB of base64 text
MID_B64 = "A" * 9_000_000  # 6.75 MB decoded: under the schema's length cap, over MAX_INPUT_IMAGE_BYTES=5 MB
WEB = "http://127.0.0.1:PORT"  # replaced by the test web server's address

# (id, server, input, exact error). "guarded" is the default server (SSRF protection on), "open" the
# one configured by OPEN_ENV. Every message names the field, what was received and what is allowed.
CASES = [
    # -- where the image comes from --------------------------------------------------------
    ("file-path", "guarded", {**VIDEO, "image_url": "/etc/passwd"},
     f"Field 'image_url' {SOURCES} '/etc/passwd'; local file paths are not accepted."),
    ("relative-path", "guarded", {**VIDEO, "image_url": "../../root/.ssh/id_rsa"},
     f"Field 'image_url' {SOURCES} '../../root/.ssh/id_rsa'; local file paths are not accepted."),
    ("windows-path", "guarded", {**VIDEO, "image_url": "C:\\Windows\\win.ini"},
     f"Field 'image_url' {SOURCES} 'C:\\\\Windows\\\\win.ini'; local file paths are not accepted."),
    ("file-url", "guarded", {**VIDEO, "image_url": "file:///etc/passwd"},
     f"Field 'image_url' {SOURCES} 'file:///etc/passwd'; 'file:' URLs are not accepted."),
    ("ftp-url", "guarded", {**VIDEO, "image_url": "ftp://example.com/cat.png"},
     f"Field 'image_url' {SOURCES} 'ftp://example.com/cat.png'; 'ftp:' URLs are not accepted."),
    ("gopher-url", "guarded", {**VIDEO, "image_url": "gopher://127.0.0.1:6379/_FLUSHALL"},
     f"Field 'image_url' {SOURCES} 'gopher://127.0.0.1:6379/_FLUSHALL'; 'gopher:' URLs are not accepted."),
    ("not-base64", "guarded", {**VIDEO, "image_url": "a picture of a cat"},
     f"Field 'image_url' {SOURCES} 'a picture of a cat', which is none of these."),
    ("not-base64-either", "guarded", {**VIDEO, "image_url": "cat.png"},
     f"Field 'image_url' {SOURCES} 'cat.png', which is none of these."),
    ("data-uri-not-base64", "guarded", {**VIDEO, "image_url": "data:image/png,hello"},
     "Field 'image_url' is a data URI that is not base64-encoded, 'data:image/png'; "
     "send data:image/...;base64,<data>."),
    ("loopback", "guarded", {**VIDEO, "image_url": f"{WEB}/ok.png"},
     f"Field 'image_url' points to '{WEB}/ok.png', which resolves to the non-public address 127.0.0.1; "
     f"{PUBLIC_ONLY}"),
    ("loopback-decimal", "guarded", {**VIDEO, "image_url": "http://2130706433/x.png"},
     f"Field 'image_url' points to 'http://2130706433/x.png', which resolves to the non-public address "
     f"127.0.0.1; {PUBLIC_ONLY}"),
    ("loopback-ipv6-mapped", "guarded", {**VIDEO, "image_url": "http://[::ffff:127.0.0.1]/x.png"},
     f"Field 'image_url' points to 'http://[::ffff:127.0.0.1]/x.png', which resolves to the non-public "
     f"address ::ffff:127.0.0.1; {PUBLIC_ONLY}"),
    ("private-10", "guarded", {**VIDEO, "image_url": "http://10.0.0.1/x.png"},
     f"Field 'image_url' points to 'http://10.0.0.1/x.png', which resolves to the non-public address "
     f"10.0.0.1; {PUBLIC_ONLY}"),
    ("metadata", "guarded", {**VIDEO, "image_url": "http://169.254.169.254/latest/meta-data"},
     f"Field 'image_url' points to 'http://169.254.169.254/latest/meta-data', which resolves to the "
     f"non-public address 169.254.169.254; {PUBLIC_ONLY}"),
    # With protection on, a redirect served from 127.0.0.1 is refused at its first hop already; that
    # redirects are re-checked is shown in-process below (test_redirects_are_checked_at_every_hop).
    ("redirect-first-hop", "guarded", {**VIDEO, "image_url": f"{WEB}/to-loopback"},
     f"Field 'image_url' points to '{WEB}/to-loopback', which resolves to the non-public address "
     f"127.0.0.1; {PUBLIC_ONLY}"),
    ("image-mode-path", "guarded", {"prompt": "a cat", "image_url": "/etc/shadow"},
     f"Field 'image_url' {SOURCES} '/etc/shadow'; local file paths are not accepted."),
    # -- img2img sizes derived from an elongated input image -----------------------------------
    ("img2img-4000x1", "guarded", {"prompt": "a cat", "image_url": png_b64(4000, 1), "height": 128, "width": 128},
     "Field 'image_url' is a 4000x1 image whose aspect ratio gives a 8088x0 result; sides from 128 to 2048 are "
     "allowed, so send a less elongated image."),
    ("img2img-1000x10", "guarded", {"prompt": "a cat", "image_url": png_b64(1000, 10), "height": 128, "width": 128},
     "Field 'image_url' is a 1000x10 image whose aspect ratio gives a 1280x8 result; sides from 128 to 2048 are "
     "allowed, so send a less elongated image."),
    # -- misbehaving servers (the open server may reach 127.0.0.1) ---------------------------
    ("slow", "open", {**VIDEO, "image_url": f"{WEB}/slow.png"},
     f"Field 'image_url' points to '{WEB}/slow.png', which did not finish downloading within 3 s; images "
     f"must download within FETCH_TIMEOUT_S=3 s or be sent as base64."),
    ("trickle", "open", {**VIDEO, "image_url": f"{WEB}/trickle.png"},
     f"Field 'image_url' points to '{WEB}/trickle.png', which did not finish downloading within 3 s; images "
     f"must download within FETCH_TIMEOUT_S=3 s or be sent as base64."),
    ("endless", "open", {**VIDEO, "image_url": f"{WEB}/endless.png"},
     f"Field 'image_url' points to '{WEB}/endless.png', which sent more than 5,000,000 bytes; at most "
     f"5,000,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES)."),
    ("announces-huge", "open", {**VIDEO, "image_url": f"{WEB}/huge.png"},
     f"Field 'image_url' points to '{WEB}/huge.png', which announces 6,000,000 bytes; at most 5,000,000 "
     f"bytes are accepted (MAX_INPUT_IMAGE_BYTES)."),
    ("gzip-bomb", "open", {**VIDEO, "image_url": f"{WEB}/gzip-bomb.png"},
     f"Field 'image_url' points to '{WEB}/gzip-bomb.png', which sent more than 5,000,000 bytes; at most "
     f"5,000,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES)."),
    ("png-bomb", "open", {**VIDEO, "image_url": f"{WEB}/bomb.png"},
     "Field 'image_url' is a 10000x10000 image (100,000,000 pixels); at most 40,000,000 pixels are accepted "
     "(MAX_INPUT_IMAGE_PIXELS)."),
    ("html-as-png", "open", {**VIDEO, "image_url": f"{WEB}/page.png"},
     f"Field 'image_url' is not a decodable image (unrecognized data starting '<!DOCTYPE html><'); send a {FORMATS}."),
    ("truncated-jpeg", "open", {**VIDEO, "image_url": f"{WEB}/truncated.jpg"},
     f"Field 'image_url' is not a decodable image (truncated or corrupt data starting '......JFIF......'); "
     f"send a {FORMATS}."),
    ("http-404", "open", {**VIDEO, "image_url": f"{WEB}/missing.png"},
     f"Field 'image_url' points to '{WEB}/missing.png', which answered HTTP 404; the image must be served "
     f"with status 200."),
    ("redirect-loop", "open", {**VIDEO, "image_url": f"{WEB}/loop"},
     f"Field 'image_url' points to '{WEB}/loop', which redirects more than 5 times; at most 5 redirects are "
     f"followed."),
    ("redirect-to-file", "open", {**VIDEO, "image_url": f"{WEB}/to-file"},
     f"Field 'image_url' points to '{WEB}/to-file', which redirects to a 'file' URL; {PUBLIC_ONLY}"),
    ("refused-connection", "open", {**VIDEO, "image_url": "http://127.0.0.1:9/x.png"},
     "Field 'image_url' points to 'http://127.0.0.1:9/x.png', which cannot be fetched (ConnectionError); "
     "send a reachable public http(s) URL."),
    ("bad-port", "open", {**VIDEO, "image_url": "http://127.0.0.1:99999/x.png"},
     "Field 'image_url' points to 'http://127.0.0.1:99999/x.png', which cannot be fetched (ValueError); "
     "send a reachable public http(s) URL."),
    ("broken-ipv6-url", "guarded", {**VIDEO, "image_url": "http://[::1/x.png"},
     "Field 'image_url' points to 'http://[::1/x.png', which cannot be fetched (ValueError); send a reachable "
     "public http(s) URL."),
    # -- sizes and lengths -------------------------------------------------------------------
    ("base64-50MB", "guarded", {**VIDEO, "image_url": BIG_B64},
     "Field 'image_url' must be a string of at most 28,000,000 characters, got string "
     "'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA... (50,000,000 characters)."),
    ("base64-over-byte-cap", "open", {**VIDEO, "image_url": MID_B64},
     "Field 'image_url' carries 6,750,000 bytes of base64 data, 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA... "
     "(9,000,000 characters); at most 5,000,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES)."),
    ("long-url", "guarded", {**VIDEO, "image_url": "https://example.com/" + "a" * 20_000},
     "Field 'image_url' must be a URL of at most 16,384 characters, got 'https://example.com/"
     "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa... (20,020 characters)."),
    ("giant-prompt", "guarded", {**VIDEO, "prompt": "x" * 5000},
     "Field 'prompt' must be a string of at most 2,000 characters, got string "
     "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (5,000 characters)."),
    ("giant-negative-prompt", "guarded", {"prompt": "a cat", "negative_prompt": "no " * 1000},
     "Field 'negative_prompt' must be a string of at most 2,000 characters, got string "
     "'no no no no no no no no no no no no no no no no no no no no... (3,000 characters)."),
    ("frames-161-at-1280", "guarded", {**VIDEO, "num_frames": 161, "height": 1280,
                                       "width": 1280},
     "Fields num_frames=161, height=1280, width=1280 make 262,400 transformer tokens; this worker allows at "
     "most 49,140 (MAX_VIDEO_TOKENS, about 1.5x a 480x832 81-frame video) to stay within GPU memory and time, "
     "so ask for fewer frames or a smaller size."),
    ("height-99999", "guarded", {**VIDEO, "height": 99999},
     "Field 'height' must be an integer from 64 to 1280 that is a multiple of 16, got number 99999."),
    ("num-frames-even", "guarded", {**VIDEO, "num_frames": 80},
     "Field 'num_frames' must be an integer from 5 to 161 of the form 4k+1, got number 80."),
    ("num-images-1000", "guarded", {"prompt": "a cat", "num_images": 1000},
     "Field 'num_images' must be an integer from 1 to 4, got number 1000."),
    ("image-pixel-budget", "guarded", {"prompt": "a cat", "num_images": 4, "height": 2048, "width": 2048},
     "Fields num_images x height x width ask for 16,777,216 pixels; this worker allows at most 8,388,608 per "
     "job (MAX_IMAGE_PIXELS), so ask for fewer or smaller images."),
    ("steps-1e6", "guarded", {**VIDEO, "num_inference_steps": 1_000_000},
     "Field 'num_inference_steps' must be an integer from 1 to 100, got number 1000000."),
    # -- odd JSON types ----------------------------------------------------------------------
    ("prompt-object", "guarded", {**VIDEO, "prompt": {"text": "a cat"}},
     "Field 'prompt' must be a string of at most 2,000 characters, got object {'text': 'a cat'}."),
    ("prompt-list", "guarded", {**VIDEO, "prompt": ["a", "cat"]},
     "Field 'prompt' must be a string of at most 2,000 characters, got array ['a', 'cat']."),
    ("prompt-number", "guarded", {**VIDEO, "prompt": 42},
     "Field 'prompt' must be a string of at most 2,000 characters, got number 42."),
    ("prompt-bool", "guarded", {**VIDEO, "prompt": True},
     "Field 'prompt' must be a string of at most 2,000 characters, got boolean True."),
    ("prompt-null", "guarded", {**VIDEO, "prompt": None},
     "Field 'prompt' is required in mode 'video' and must be a string of at most 2,000 characters."),
    ("prompt-blank", "guarded", {**VIDEO, "prompt": "   "},
     "Field 'prompt' must describe the video, got '   ', which is only white space."),
    ("prompt-empty", "guarded", {**VIDEO, "prompt": ""},
     "Field 'prompt' must describe the video, got an empty string."),
    ("image-url-object", "guarded", {**VIDEO, "image_url": {"url": "http://example.com/cat.png"}},
     "Field 'image_url' must be a string of at most 28,000,000 characters, got object "
     "{'url': 'http://example.com/cat.png'}."),
    ("height-float", "guarded", {**VIDEO, "height": 1.5},
     "Field 'height' must be an integer from 64 to 1280 that is a multiple of 16, got number 1.5."),
    ("height-bool", "guarded", {**VIDEO, "height": True},
     "Field 'height' must be an integer from 64 to 1280 that is a multiple of 16, got boolean True."),
    ("height-string", "guarded", {**VIDEO, "height": "64"},
     "Field 'height' must be an integer from 64 to 1280 that is a multiple of 16, got string '64'."),
    ("seed-negative", "guarded", {**VIDEO, "seed": -1},
     "Field 'seed' must be an integer from 0 to 4294967295, got number -1."),
    ("seed-2**40", "guarded", {**VIDEO, "seed": 2**40},
     "Field 'seed' must be an integer from 0 to 4294967295, got number 1099511627776."),
    ("mode-unknown", "guarded", {**VIDEO, "mode": "audio"},
     "Field 'mode' must be one of 'image', 'video', got string 'audio'."),
    ("mode-list", "guarded", {**VIDEO, "mode": ["video"]},
     "Field 'mode' must be one of 'image', 'video', got array ['video']."),
    ("unknown-field", "guarded", {**VIDEO, "__proto__": {"admin": True}},
     f"Field '__proto__' is not accepted in mode 'video'; allowed fields are: {', '.join(INPUT_SCHEMA['video'])}."),
    ("empty-input", "guarded", {},
     "Field 'prompt' is required in mode 'image' unless image_url is given."),
    # -- text the libraries below cannot take (JSON carries a lone surrogate as "\ud800") --------
    ("prompt-lone-surrogate", "guarded", {"prompt": "a \ud800 b", "height": 128, "width": 128},
     "Field 'prompt' must be valid Unicode text, got 'a \\ud800 b', which holds a lone UTF-16 surrogate ('\\ud800') "
     "at character 3; send whole characters (a complete surrogate pair, or the text as UTF-8)."),
    ("lora-path-nul", "guarded", {"prompt": "a cat", "loras": [{"path": "/models/a\x00.safetensors"}]},
     "Field 'loras[0].path' must not hold a NUL character, got '/models/a\\x00.safetensors' (NUL at character 10); "
     "no file path can hold one."),
]


def _fill(value, web_url: str):
    if isinstance(value, str):
        return value.replace(WEB, web_url)
    if isinstance(value, dict):
        return {k: _fill(v, web_url) for k, v in value.items()}
    return value


def _one_sentence(message: str) -> None:
    assert message.endswith(".") and "\n" not in message, message
    assert len(message) < 400, f"{len(message)} characters: {message[:200]}"


@pytest.mark.parametrize(("server", "job_input", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_hostile_request_is_refused_with_one_clear_sentence(request, web, server, job_input, expected):
    api = request.getfixturevalue("api" if server == "guarded" else "open_api")
    web_url = web.url_for("").rstrip("/")
    job_input = _fill(job_input, web_url)
    start = time.monotonic()
    result = api.runsync(job_input, timeout=60)
    elapsed = time.monotonic() - start
    assert result["status"] == "FAILED", str(result)[:300]
    assert result["error"] == expected.replace(WEB, web_url)
    _one_sentence(result["error"])
    # Nothing hangs: slow servers are cut at the deadline, everything else (50 MB of JSON included) is
    # refused within seconds.
    limit = FETCH_TIMEOUT_S + 3 if server == "open" else 10
    assert elapsed < limit, elapsed


@pytest.mark.parametrize("prompt", ["a cat 🐈‍⬛ jumps 🚀✨", "一只猫在雪地里奔跑", "قطة تقفز فوق الجدار",
                                    "\u202eevil\u202c mixed ‮RTL‬ \u200b zero-width"])
def test_unicode_prompts_make_a_video(api, prompt):
    result = api.runsync({**VIDEO, "prompt": prompt, "negative_prompt": prompt[::-1],
                          "image_url": png_b64(48, 32)}, timeout=120)
    assert result["status"] == "COMPLETED", str(result)[:300]
    assert result["output"]["video"].startswith("data:video/mp4;base64,")
    assert (result["output"]["width"], result["output"]["height"], result["output"]["num_frames"]) == (64, 64, 5)


def test_both_servers_still_serve_after_the_hostile_table(api, open_api, web):
    # The open server fetches the first frame over HTTP through a redirect.
    for server, image_url in ((api, "data:image/png;base64," + png_b64(48, 32)),
                              (open_api, web.url_for("/to-ok"))):
        result = server.runsync({**VIDEO, "image_url": image_url}, timeout=120)
        assert result["status"] == "COMPLETED", str(result)[:300]
        assert result["output"]["video"].startswith("data:video/mp4;base64,")


def test_server_logs_never_hold_a_payload(api, open_api):
    for server in (api, open_api):
        log = server.log()
        runs = re.findall(r"[A-Za-z0-9+/=]{1000,}", log)
        assert not runs, f"{len(runs)} long base64 runs in the server log, e.g. {runs[0][:80]}..."
    # No hostile input reached the handler's internal-error path (which logs a traceback). Checked on
    # the server this module owns; the default one is shared with other test modules.
    assert "Traceback" not in open_api.log(), open_api.log()[-3000:]


# ---------------------------------------------------------------------------------------------
# 2. Property-based fuzzing
# ---------------------------------------------------------------------------------------------
# Text that JSON carries and the libraries below refuse: lone UTF-16 surrogates, NUL.
ODD_CHARS = ("\ud800", "\udfff", "\ud83d", "\x00")
ODD_TEXT = st.builds(lambda a, odd, b: a + odd + b, st.text(max_size=10), st.sampled_from(ODD_CHARS),
                     st.text(max_size=10))
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
                | ODD_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
ALL_FIELDS = sorted({name for fields in INPUT_SCHEMA.values() for name in fields})


@functools.cache  # one strategy per field: hypothesis keeps a repr of every strategy it builds
def edge_values(name: str) -> st.SearchStrategy:
    """Values near and past each field's limits, of the right and the wrong type."""
    params = [fields[name] for fields in INPUT_SCHEMA.values() if name in fields]
    out = []
    for p in params:
        for bound in (p.minimum, p.maximum):
            if bound is not None:
                out += [bound, bound - 1, bound + 1, bound + 0.5, -bound]
        if p.choices:
            out += list(p.choices) + [c.lower() + " " for c in p.choices if isinstance(c, str)]
        if p.max_length and p.max_length <= 10_000:  # image_url's 28 M characters: in the API table
            out += ["", " ", "x" * p.max_length, "x" * (p.max_length + 1)]
        elif p.max_length:
            out += ["", " "]
        if p.type is str:
            out += ["a \ud800 b", "\udfff", "x\x00y", "/models/a\x00.safetensors"]
        if p.items:  # a list of objects (LoRAs)
            entry = {k: "x" for k, sub in p.items.items() if sub.required}
            out += [[], [{}], [entry], [entry] * ((p.max_items or 1) + 1), [{**entry, "junk": 1}],
                    [{"path": "/etc/passwd"}], [{"path": "file:///etc/passwd"}], ["string"], [None], [{"path": " "}],
                    [{"path": "me/st\ud800yle"}], [{"path": "/models/a\x00.safetensors"}],
                    [{"path": "me/style", "weight_name": "a\udfff.safetensors"}],
                    [{"path": "me/style", "weight_name": "a\x00.safetensors"}]]
        if p.default is not None:
            out.append(p.default)
    return st.sampled_from(out or [0]) | JSON_VALUES


RAW_INPUTS = st.one_of(
    JSON_VALUES,
    st.dictionaries(st.sampled_from([*ALL_FIELDS, "junk", "__proto__"]), JSON_VALUES, max_size=6),
    st.builds(lambda mode, fields: fields if mode == "absent" else {"mode": mode, **fields},
              st.sampled_from(["image", "video", None, "Video", 1, "absent"]),
              st.lists(st.sampled_from(ALL_FIELDS), unique=True, max_size=10).flatmap(
                  lambda keys: st.fixed_dictionaries({k: edge_values(k) for k in keys}))),
)


@given(RAW_INPUTS)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_validate_input_returns_a_job_or_raises_input_error(raw):
    try:
        job = validate_input(raw)
    except InputError as err:
        message = str(err)
        _one_sentence(message)
        assert message.startswith(("Field", "Fields", "The job input")), message
        return
    assert isinstance(job, (ImageJob, VideoJob))
    assert {f.name for f in dataclasses.fields(job)} == set(INPUT_SCHEMA[job.mode])
    json.dumps(dataclasses.asdict(job))  # whatever passes is plain JSON again


TINY_PNG = png_b64(24, 16)


# Fields whose valid values all keep a tiny job tiny. Any other field (sizes, steps, counts, and
# whatever the schema grows, e.g. LoRAs or presets that may download weights) only ever gets values
# that validation refuses.
CHEAP = {"mode", "prompt", "negative_prompt", "seed", "fps", "guidance_scale", "flow_shift", "output", "scheduler",
         "strength", "high_noise_frac"}


def _accepted(param, name: str, value) -> bool:
    if value is None:
        return True  # absent: the (large) default applies
    try:
        coerce(name, param, value)
        return True
    except InputError:
        return False


def hostile(name: str, mode: str) -> st.SearchStrategy:
    """Edge and junk values for a field; outside CHEAP, only values validation refuses (so whatever
    passes validation runs in about a second on the CPU)."""
    values = edge_values(name)
    if name not in CHEAP:
        param = INPUT_SCHEMA[mode][name]
        values = values.filter(lambda v: not _accepted(param, name, v))
    return values


def image_urls() -> st.SearchStrategy:
    wrapped = " \n" + TINY_PNG[:50] + "\n" + TINY_PNG[50:]  # whitespace around and inside base64 is fine
    valid = st.sampled_from([TINY_PNG, "data:image/png;base64," + TINY_PNG, wrapped])
    return valid | st.sampled_from([
        TINY_PNG, "data:image/png;base64," + TINY_PNG, "/etc/passwd", "file:///etc/passwd",
        "http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/meta-data", "", "   ", "not an image",
        base64.b64encode(b"GIF89a" + b"\0" * 20).decode(), base64.b64encode(png_header_only(30000, 30000)).decode(),
        base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n").decode(), "data:image/png;base64,!!!",
        "data:image/png;base64,\ud800" + TINY_PNG, "http://127.0.0.1:9/a\x00.png",
        TINY_PNG[:40] + "\x00" + TINY_PNG[40:],
    ]) | JSON_VALUES


# Junk that cannot be a valid request (a dict with a key no mode accepts, or not a dict at all).
JUNK_INPUTS = JSON_VALUES.filter(lambda v: not isinstance(v, dict) or not v or any(k not in ALL_FIELDS for k in v))


# Tiny valid values per mode: required/expensive fields are always sent (their defaults are large),
# the others sometimes.
TINY = {
    "video": ({"mode": st.just("video"), "image_url": st.just(TINY_PNG),
               "prompt": (st.text(min_size=1, max_size=20) | ODD_TEXT).filter(str.strip), "num_frames": st.just(5),
               "height": st.sampled_from([64, 80]), "width": st.sampled_from([64, 80]),
               "num_inference_steps": st.integers(1, 2)},
              {"negative_prompt": st.text(max_size=20) | ODD_TEXT, "fps": st.integers(1, 60),
               "guidance_scale": st.floats(1, 20), "flow_shift": st.floats(0.5, 20), "seed": st.integers(0, 2**32 - 1),
               "output": st.sampled_from(["auto", "base64"])}),
    "image": ({"prompt": st.text(min_size=1, max_size=20) | ODD_TEXT, "height": st.just(128), "width": st.just(128),
               "num_inference_steps": st.just(2), "refiner_inference_steps": st.just(2),
               "high_noise_frac": st.just(0.5), "num_images": st.just(1), "strength": st.floats(0.5, 1)},
              {"mode": st.just("image"), "image_url": st.just(TINY_PNG),
               "scheduler": st.sampled_from(tuple(SCHEDULERS)), "guidance_scale": st.floats(0, 30),
               "seed": st.integers(0, 2**32 - 1), "output": st.sampled_from(["auto", "base64"])}),
}


@st.composite
def handler_inputs(draw) -> object:
    """A tiny valid request of either mode with up to three fields made hostile, or junk."""
    mode = draw(st.sampled_from(["video", "image", "junk"]))
    if mode == "junk":
        return draw(JUNK_INPUTS)
    always, sometimes = TINY[mode]
    job = {name: draw(strategy) for name, strategy in always.items()}
    job |= draw(st.fixed_dictionaries({}, optional=sometimes))
    count = draw(st.sampled_from([0, 1, 1, 2, 3]))  # about one request in five stays valid (and runs)
    for name in draw(st.lists(st.sampled_from(sorted(INPUT_SCHEMA[mode])), unique=True, min_size=count,
                              max_size=count)):
        job[name] = draw(image_urls() if name == "image_url" else hostile(name, mode))
    return job


@pytest.fixture()
def one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spin-waiting
    makes a 0.1 s job take seconds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@given(job_input=handler_inputs())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_handler_answers_every_input_with_a_result_or_one_error_string(run_job, one_torch_thread, job_input):
    result = run_job(job_input)
    assert isinstance(result, dict)
    event("refused" if "error" in result else "video made" if "video" in result else "images made")
    if "error" in result:
        assert set(result) == {"error"} and isinstance(result["error"], str), result
        _one_sentence(result["error"])
        assert "internal error" not in result["error"], result["error"]
    elif "video" in result:
        assert result["video"].startswith("data:video/mp4;base64,")
        assert result["num_frames"] == 5 and result["width"] in (64, 80) and result["height"] in (64, 80)
    else:
        assert result["images"] and all(uri.startswith("data:image/png;base64,") for uri in result["images"])
        assert result["image_url"] == result["images"][0]


# Every string field of both modes, the LoRA entries' included.
STRING_FIELDS = [(mode, name) for mode, fields in INPUT_SCHEMA.items() for name, p in fields.items()
                 if p.type is str] + [(mode, f"loras[0].{key}") for mode, fields in INPUT_SCHEMA.items()
                                      for key, sub in fields["loras"].items.items() if sub.type is str]
TINY_IMAGE = {"prompt": "a cat", "height": 128, "width": 128, "num_inference_steps": 2, "refiner_inference_steps": 2}


def _with_field(mode: str, field: str, value: str) -> dict:
    """A tiny valid request of `mode` whose `field` ('loras[0].path' names a LoRA entry's key) is `value`."""
    job = dict(VIDEO if mode == "video" else TINY_IMAGE)
    if field.startswith("loras[0]."):
        key = field.split(".")[1]
        job["loras"] = [{"path": "me/style", key: value}]
    else:
        job[field] = value
    return job


@pytest.mark.parametrize(("mode", "field"), STRING_FIELDS, ids=[f"{m}-{f}" for m, f in STRING_FIELDS])
def test_a_lone_surrogate_in_any_string_field_is_refused_by_name(run_job, mode, field):
    result = run_job(_with_field(mode, field, "a \ud800 b"))
    assert result == {"error": f"Field '{field}' must be valid Unicode text, got 'a \\ud800 b', which holds a lone "
                               f"UTF-16 surrogate ('\\ud800') at character 3; send whole characters (a complete "
                               f"surrogate pair, or the text as UTF-8)."}


@pytest.mark.parametrize(("mode", "field"), STRING_FIELDS, ids=[f"{m}-{f}" for m, f in STRING_FIELDS])
def test_a_nul_in_any_string_field_is_refused_where_it_would_make_a_path_and_harmless_elsewhere(
        run_job, one_torch_thread, mode, field):
    result = run_job(_with_field(mode, field, "a\x00b"))
    if field.startswith("loras[0]."):
        assert result == {"error": f"Field '{field}' must not hold a NUL character, got 'a\\x00b' (NUL at character "
                                   f"2); no file path can hold one."}
    elif field in ("prompt", "negative_prompt"):  # free text: the tokenizers read a NUL like any character
        assert "error" not in result, result
    else:
        assert set(result) == {"error"} and "internal error" not in result["error"], result
        _one_sentence(result["error"])


# ---------------------------------------------------------------------------------------------
# 3. fetch_url / decode_image in-process
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def private_ok(monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")


def _fetch(url: str, max_bytes: int = 5_000_000, timeout_s: float = 2.0) -> tuple[bytes | str, float]:
    start = time.monotonic()
    try:
        result: bytes | str = fetch_url(url, "image_url", max_bytes=max_bytes, timeout_s=timeout_s)
    except InputError as err:
        result = str(err)
    return result, time.monotonic() - start


def test_fetch_returns_the_image_bytes_through_redirects(private_ok, web):
    data, _ = _fetch(web.url_for("/to-ok"))
    assert Image.open(io.BytesIO(data)).size == (48, 32)


@pytest.mark.parametrize("path", ["/endless.png", "/gzip-bomb.png"])
def test_byte_cap_holds_while_streaming_a_body_without_length(private_ok, web, path):
    message, elapsed = _fetch(web.url_for(path), max_bytes=1_000_000)
    assert message == (f"Field 'image_url' points to '{web.url_for(path)}', which sent more than 1,000,000 bytes; "
                       f"at most 1,000,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES).")
    assert elapsed < 2


def test_byte_cap_holds_when_the_server_sends_no_length_and_closes_to_end(private_ok, raw_server):
    server = raw_server(_endless_without_length)
    message, elapsed = _fetch(server.url, max_bytes=1_000_000)
    assert message == (f"Field 'image_url' points to '{server.url}', which sent more than 1,000,000 bytes; at most "
                       f"1,000,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES).")
    assert elapsed < 2


def test_a_lying_content_length_never_lets_more_in(private_ok, raw_server):
    # Longer body than declared: only the declared bytes are read.
    data, elapsed = _fetch(raw_server(_claims_1000_bytes_sends_endless).url, max_bytes=1_000_000)
    assert data == b"\0" * 1000 and elapsed < 2
    # Shorter body than declared: a clear refusal, not a hang or a half image.
    server = raw_server(_claims_1000000_bytes_sends_100)
    message, elapsed = _fetch(server.url, max_bytes=5_000_000)
    assert message == (f"Field 'image_url' points to '{server.url}', which broke off while sending the image "
                       f"(ProtocolError); send a URL that serves the whole image.")
    assert elapsed < 2


def test_a_declared_length_over_the_cap_is_refused_before_the_body(private_ok, web):
    message, _ = _fetch(web.url_for("/huge.png"), max_bytes=1_000_000)
    assert message == (f"Field 'image_url' points to '{web.url_for('/huge.png')}', which announces 6,000,000 "
                       f"bytes; at most 1,000,000 bytes are accepted (MAX_INPUT_IMAGE_BYTES).")


@pytest.mark.parametrize("path", ["/trickle.png", "/slow.png"])
def test_deadline_holds_against_slow_and_trickling_servers(private_ok, web, path):
    message, elapsed = _fetch(web.url_for(path), timeout_s=2.0)
    assert message == (f"Field 'image_url' points to '{web.url_for(path)}', which did not finish downloading "
                       f"within 2 s; images must download within FETCH_TIMEOUT_S=2 s or be sent as base64.")
    assert 1.9 < elapsed < 2 + 2, elapsed


def test_deadline_holds_against_headers_sent_one_byte_at_a_time(private_ok, raw_server):
    server = raw_server(_trickled_headers)
    message, elapsed = _fetch(server.url, timeout_s=2.0)
    assert message.endswith("which did not finish downloading within 2 s; images must download within "
                            "FETCH_TIMEOUT_S=2 s or be sent as base64."), message
    assert elapsed < 2 + 2, elapsed


def test_redirects_are_checked_at_every_hop(monkeypatch, web):
    """With protection on, a public host that redirects to an internal one is refused at the redirect.

    Offline there is no public host, so one is simulated: the name 'public.example' resolves to
    127.0.0.1 and passes the first hop's check; every redirect target goes through runpod's real
    check. The control case shows the simulated host is fetched when it redirects to itself."""
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    real = rp_ssrf.resolve_and_validate

    def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "public.example" else real(host, port)

    monkeypatch.setattr(rp_ssrf, "resolve_and_validate", resolve)
    public = f"http://public.example:{web.port}"
    data, _ = _fetch(f"{public}/to-ok")  # control: /to-ok redirects to /ok.png on the same host
    assert Image.open(io.BytesIO(data)).size == (48, 32)
    for path, refusal in [
        ("/to-loopback", "redirects to '127.0.0.1', which resolves to the non-public address 127.0.0.1; "),
        ("/to-metadata", "redirects to '169.254.169.254', which resolves to the non-public address "
                         "169.254.169.254; "),
        ("/to-file", "redirects to a 'file' URL; "),
    ]:
        message, _ = _fetch(public + path)
        assert message == f"Field 'image_url' points to '{public}{path}', which {refusal}{PUBLIC_ONLY}"


@pytest.mark.parametrize(("data", "expected"), [
    (b"", f"Field 'image_url' holds no data; send a {FORMATS}."),
    (png_header_only(10_000, 10_000),
     "Field 'image_url' is a 10000x10000 image (100,000,000 pixels); at most 40,000,000 pixels are accepted "
     "(MAX_INPUT_IMAGE_PIXELS)."),
    (png_header_only(30_000, 30_000),  # past PIL's own hard limit, which raises inside Image.open
     "Field 'image_url' is an image of 900,000,000 pixels; at most 40,000,000 pixels are accepted "
     "(MAX_INPUT_IMAGE_PIXELS)."),
    (png_header_only(64, 64),
     f"Field 'image_url' is not a decodable image (truncated or corrupt data starting '.PNG........IHDR'); send a "
     f"{FORMATS}."),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
     f"Field 'image_url' is not a decodable image (unrecognized data starting '%!PS-Adobe-3.0 E'); send a {FORMATS}."),
    (b"\x00\x00\x01\x00" + b"\x00" * 40,
     f"Field 'image_url' is not a decodable image (unrecognized data starting '................'); send a {FORMATS}."),
], ids=["empty", "over-budget", "past-pil-limit", "no-pixel-data", "postscript", "icon"])
def test_decode_image_refusals(data, expected):
    with pytest.raises(InputError) as err:
        decode_image(data, "image_url", max_pixels=40_000_000)
    assert str(err.value) == expected


def test_decode_image_checks_pixels_before_decoding_a_real_bomb():
    bomb = png_bomb(10_000)
    assert len(bomb) < 100_000
    start = time.monotonic()
    with pytest.raises(InputError, match="10000x10000 image"):
        decode_image(bomb, "image_url", max_pixels=40_000_000)
    assert time.monotonic() - start < 0.5
    assert decode_image(png_bytes(png_image(30, 20)), "image_url", max_pixels=600).size == (30, 20)
