"""The SSRF-safe downloader for user-supplied URLs: input images (image_url) and LoRA files.

URLs are fetched through runpod's `safe_get` (public addresses only, re-checked on every
redirect, pinned against DNS rebinding) under a hard overall deadline and a byte cap enforced
while streaming. Every refusal is an `InputError` of one sentence, worded by the caller
through `Refusals` so that each names its own field or setting.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from errors import InputError, shorten

_CHUNK = 64 * 1024


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
    Every refusal is an InputError of one sentence from `words`. An OSError of `write` (a full disk, a
    read-only folder) is raised as it is: the worker's fault, not the server's.
    """
    timeout_s = max(timeout_s, 0.01)
    outcome: queue.SimpleQueue = queue.SimpleQueue()
    cancelled = threading.Event()

    def run() -> None:
        try:
            _stream(url, write, max_bytes, timeout_s, words, chunk_size, cancelled)
            outcome.put(None)
        except (InputError, _WriteFailed) as err:
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
    if isinstance(result, _WriteFailed):
        raise result.error from None


class _WriteFailed(Exception):
    """`write` could not keep a chunk (kept apart from the OSErrors of a connection that breaks off)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


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
                try:
                    write(chunk)
                except OSError as err:
                    raise _WriteFailed(err) from None
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
