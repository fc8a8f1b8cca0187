"""Result delivery: inline base64 data URIs, or uploads to S3-compatible storage with presigned URLs.

Uploads use boto3 directly (runpod's rp_upload labels .mp4 as image/mp4 and silently writes
to a local folder when the bucket is not fully configured). Each object lands under a key
holding the job id, with its real Content-Type. A failed upload is retried with backoff;
if it still fails the result comes back inline with a warning. An inline result over RunPod's
payload limit (MAX_INLINE_MB) comes back smaller with a warning (an MP4 re-encoded at a lower
bitrate, images as JPEG) rather than lost; only one that cannot be made to fit fails the job.
Credentials never reach a message or a log. Local runs save results to files (`save_local`).
"""

from __future__ import annotations

import base64
import io
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from errors import DeliveryError
from folders import folder_fault
from inline import inline_bytes, inline_fix, inline_limit
from settings import Bucket, Settings
from video_utils import data_uri, jpeg_bytes, shrink_mp4

log = logging.getLogger("worker")
# RunPod caps job payloads (10 MB on /run, 20 MB on /runsync); inline results stay under it (MAX_INLINE_MB).
MAX_INLINE_CHARS = Settings.max_inline_chars
JPEG_QUALITIES = (90, 75)  # the tries for images too large as PNG: both look like the PNG at a glance
# Tries per object and the first pause between them (doubled after each failure): 1 s + 2 s.
UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


# A run this long of base64 characters is a payload (an image or a video), never words worth logging.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{1000,}={0,2}")


def cut_payloads(text: str) -> str:
    return _BASE64_RUN.sub(lambda m: f"{m.group()[:40]}...({len(m.group()):,} base64 characters)", text)


class PayloadFilter(logging.Filter):
    """Keeps base64 out of the worker's log: an exception's text (logged with its traceback when a job fails
    inside) may quote a request's image or a result."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _BASE64_RUN.search(message):
            record.msg, record.args = cut_payloads(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = cut_payloads(record.exc_text)
        return True


@dataclass(frozen=True)
class Artifact:
    data: bytes
    mime: str
    filename: str


class UploadFailed(RuntimeError):
    pass


def _scrub(text: str, bucket: Bucket) -> str:
    for secret in (bucket.secret_access_key, bucket.access_key_id):
        if secret:
            text = text.replace(secret, "***")
    return text


def _client(bucket: Bucket):
    import boto3
    from botocore.config import Config

    # Retries are ours (below), so that connection failures and auth errors get the same backoff.
    # Checksums only when required: botocore >= 1.36 otherwise adds CRC headers that several
    # S3-compatible stores (older MinIO, R2, B2, Spaces) reject.
    config = Config(signature_version="s3v4", retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=5, read_timeout=30, s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.client("s3", endpoint_url=bucket.endpoint_url, aws_access_key_id=bucket.access_key_id,
                        aws_secret_access_key=bucket.secret_access_key, config=config,
                        region_name=bucket.region)


def object_prefix(job_id: str) -> str:
    """'<job id>/<random>': the random part keeps a re-run of the same job id from overwriting."""
    return f"{_UNSAFE_KEY_CHARS.sub('_', job_id) or 'job'}/{uuid.uuid4().hex[:8]}"


def upload(artifacts: list[Artifact], job_id: str, bucket: Bucket, attempts: int | None = None,
           backoff_s: float | None = None) -> list[str]:
    """Upload each artifact under '<job id>/<random>/<file>' and return presigned GET URLs, retrying failures.

    Any failure (endpoint down, credentials refused, bucket missing, even a client that cannot be
    built) is retried `attempts` times in all, then raised as `UploadFailed` with a message free of
    credentials.
    """
    attempts = UPLOAD_ATTEMPTS if attempts is None else max(1, attempts)
    backoff_s = UPLOAD_BACKOFF_S if backoff_s is None else backoff_s
    prefix = object_prefix(job_id)
    client = None
    urls = []
    for artifact in artifacts:
        key = f"{prefix}/{artifact.filename}"
        for attempt in range(1, attempts + 1):
            try:
                client = client or _client(bucket)
                client.put_object(Bucket=bucket.name, Key=key, Body=artifact.data, ContentType=artifact.mime)
                urls.append(client.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket.name, "Key": key}, ExpiresIn=bucket.url_expiry_s))
                break
            except Exception as err:  # noqa: BLE001 - every failure gets the retry and then the inline fallback
                cause = _scrub(_describe(err), bucket)
                if attempt == attempts:
                    raise UploadFailed(cause) from None
                log.warning("upload of %s failed (%s); attempt %d/%d", key, cause, attempt, attempts)
                time.sleep(backoff_s * 2 ** (attempt - 1))
    return urls


def _describe(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code = response["Error"].get("Code", "")
        message = response["Error"].get("Message", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = f"{code}: {message}".strip(": ")
        if text:
            return text
        return f"HTTP {status}" if status else type(err).__name__
    return type(err).__name__ + (f": {err}" if str(err) else "")


class Delivered(NamedTuple):
    urls: list[str]  # one URL or data URI per artifact
    warnings: list[str]
    upload_s: float | None  # seconds spent uploading (None: returned inline without trying)


def deliver(artifacts: list[Artifact], job_id: str, bucket: Bucket | None, output: str,
            attempts: int | None = None, backoff_s: float | None = None,
            limit: int = MAX_INLINE_CHARS) -> Delivered:
    """The artifacts delivered according to the request's `output`.

    output 'base64' (or no bucket) inlines within `limit` characters (MAX_INLINE_MB), shrinking a result that is
    over it (`inline`); 'auto' and 's3' upload when a bucket is configured ('s3' without one is refused when the job
    is checked, so no result is made only to be dropped) and fall back to inline when the upload fails.
    """
    if bucket is None or output == "base64":
        return Delivered(*inline(artifacts, limit, inline_fix(bucket)), None)
    attempts = UPLOAD_ATTEMPTS if attempts is None else max(1, attempts)
    start = time.perf_counter()
    try:
        return Delivered(upload(artifacts, job_id, bucket, attempts=attempts, backoff_s=backoff_s), [],
                         time.perf_counter() - start)
    except UploadFailed as err:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        failed = f"Upload to bucket '{bucket.name}' failed after {tries} ({err})"
        try:
            uris, warnings = inline(artifacts, limit, "fix the bucket settings to receive it as a URL")
        except DeliveryError as too_big:
            message = f"{failed}, and {str(too_big)[0].lower()}{str(too_big)[1:]}"
            log.error("%s", message)
            raise DeliveryError(message) from None
        log.error("upload to bucket '%s' failed after %s (%s); returning the result inline", bucket.name, tries, err)
        return Delivered(uris, [f"{failed}; the result is returned inline as base64 instead.", *warnings],
                         time.perf_counter() - start)


def inline(artifacts: list[Artifact], limit: int, fix: str) -> tuple[list[str], list[str]]:
    """Data URIs of the artifacts within `limit` characters, and warnings. A result over the limit comes back smaller
    rather than lost: an MP4 re-encoded at the bitrate that fits, images as JPEG; a DeliveryError naming the limit
    and `fix` (how to receive it whole) when even that is over."""
    uris = [data_uri(a.data, a.mime) for a in artifacts]
    size = sum(len(uri) for uri in uris)
    if size <= limit:
        return uris, []
    was = f"The result took {size:,} characters as base64, over {inline_limit(limit)}"
    if artifacts[0].mime == "video/mp4":
        return _smaller_video(artifacts[0], limit, was, fix)
    return _smaller_images(artifacts, limit, was, fix)


def _smaller_video(artifact: Artifact, limit: int, was: str, fix: str) -> tuple[list[str], list[str]]:
    mp4, kbps = shrink_mp4(artifact.data, inline_bytes(limit, "video/mp4"))
    uri = data_uri(mp4, "video/mp4")
    if len(uri) > limit:
        raise DeliveryError(f"{was}, and re-encoded at {kbps:,} kbit/s it still took {len(uri):,}; {fix}, or ask "
                            f"for fewer frames or a smaller size.")
    return [uri], [f"{was}, so the video was re-encoded at {kbps:,} kbit/s ({len(uri):,} characters); {fix}, at "
                   f"full quality."]


def _smaller_images(artifacts: list[Artifact], limit: int, was: str, fix: str) -> tuple[list[str], list[str]]:
    images = [Image.open(io.BytesIO(a.data)) for a in artifacts]
    for quality in JPEG_QUALITIES:
        uris = [data_uri(jpeg_bytes(image, quality), "image/jpeg") for image in images]
        size = sum(len(uri) for uri in uris)
        if size <= limit:
            what = "the image is" if len(images) == 1 else f"the {len(images)} images are"
            return uris, [f"{was}, so {what} returned as JPEG at quality {quality} ({size:,} characters); {fix}, at "
                          f"full quality."]
    raise DeliveryError(f"{was}, and as JPEG at quality {quality} it still took {size:,}; {fix}, or ask for fewer or "
                        f"smaller images.")


# ---------------------------------------------------------------------------------------------
# Local runs
# ---------------------------------------------------------------------------------------------
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "video/mp4": "mp4"}


def save_local(result: dict[str, Any], root: str, job_id: str) -> dict[str, Any]:
    """Local runs (`python handler.py`, --test_input): write every inline data URI of a result to <root>/<job id>/
    and return the result with the paths in their place, so the log shows paths rather than megabytes of base64;
    {"error": sentence} when LOCAL_OUTPUT_DIR (`root`) cannot take them."""
    try:
        return _save(result, Path(root) / job_id)
    except OSError as err:
        fault = folder_fault(err, "LOCAL_OUTPUT_DIR", root) or (
            f"LOCAL_OUTPUT_DIR={root!r} gave '{err.strerror}'; set LOCAL_OUTPUT_DIR to another folder")
        return {"error": f"The result could not be saved locally: {fault}."}


def _save(result: dict[str, Any], directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    shown = dict(result)
    for field, stem in (("video", "video"), ("images", "image-{i}")):
        values = result.get(field)
        if values is None:
            continue
        paths = []
        for i, uri in enumerate([values] if isinstance(values, str) else values):
            if uri.startswith("data:"):
                header, data = uri.split(",", 1)
                mime = header.removeprefix("data:").split(";")[0]
                path = directory / f"{stem.format(i=i)}.{_EXTENSIONS.get(mime, 'bin')}"
                path.write_bytes(base64.b64decode(data))
                log.info("wrote %s", path)
                uri = str(path)
            paths.append(uri)
        shown[field] = paths[0] if isinstance(values, str) else paths
    if "images" in shown:
        shown["image_url"] = shown["images"][0]
    return shown
