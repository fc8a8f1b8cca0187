"""Result delivery: inline base64 data URIs, or uploads to S3-compatible storage with presigned URLs.

Uploads use boto3 directly (runpod's rp_upload labels .mp4 as image/mp4 and silently writes
to a local folder when the bucket is not fully configured). Each object lands under a key
holding the job id, with its real Content-Type. A failed upload is retried with backoff;
if it still fails the result comes back inline with a warning when it fits RunPod's payload
limit, otherwise the job fails with the cause. Credentials never reach a message or a log.
"""

from __future__ import annotations

import base64
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import DeliveryError
from settings import Bucket
from video_utils import data_uri

log = logging.getLogger("worker")
# RunPod caps job payloads (10 MB on /run, 20 MB on /runsync); inline results stay under it.
MAX_INLINE_CHARS = 10_000_000
# Tries per object and the first pause between them (doubled after each failure): 1 s + 2 s.
UPLOAD_ATTEMPTS = 3
UPLOAD_BACKOFF_S = 1.0
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


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


def deliver(artifacts: list[Artifact], job_id: str, bucket: Bucket | None, output: str,
            attempts: int | None = None, backoff_s: float | None = None) -> tuple[list[str], list[str]]:
    """Return (one URL or data URI per artifact, warnings) according to the request's `output`.

    output 'base64' (or no bucket) inlines, refusing a result RunPod could not carry; 'auto' and 's3'
    upload when a bucket is configured ('s3' without one is refused when the job is checked, so no
    result is made only to be dropped).
    """
    if bucket is None or output == "base64":
        inline = [data_uri(a.data, a.mime) for a in artifacts]
        size = sum(len(uri) for uri in inline)
        if size > MAX_INLINE_CHARS:
            # RunPod would drop a result this large; say so instead of losing it without a word.
            fix = ("ask for output 'auto' to receive it as a URL from the configured bucket" if bucket else
                   "configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY) to "
                   "receive it as a URL")
            raise DeliveryError(f"The result is {size:,} characters as base64, over the {MAX_INLINE_CHARS:,} that "
                                f"RunPod carries inline for /run (20 MB for /runsync); {fix}, or ask for a smaller "
                                f"output.")
        return inline, []
    attempts = UPLOAD_ATTEMPTS if attempts is None else max(1, attempts)
    try:
        return upload(artifacts, job_id, bucket, attempts=attempts, backoff_s=backoff_s), []
    except UploadFailed as err:
        inline = [data_uri(a.data, a.mime) for a in artifacts]
        size = sum(len(uri) for uri in inline)
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if size <= MAX_INLINE_CHARS:
            log.error("upload to bucket '%s' failed after %s (%s); returning the result inline",
                      bucket.name, tries, err)
            return inline, [f"Upload to bucket '{bucket.name}' failed after {tries} ({err}); "
                            f"the result is returned inline as base64 instead."]
        message = (f"Upload to bucket '{bucket.name}' failed after {tries} ({err}) and the result "
                   f"({size:,} characters as base64) exceeds the {MAX_INLINE_CHARS:,}-character inline limit; "
                   f"fix the bucket settings or ask for a smaller output.")
        log.error("%s", message)
        raise DeliveryError(message) from None


def save_local(result: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Write every inline data URI of a result to `directory`; returns the result with paths in their place."""
    directory.mkdir(parents=True, exist_ok=True)
    shown = dict(result)
    for field, name in (("video", "video.mp4"), ("images", None)):
        values = result.get(field)
        if values is None:
            continue
        paths = []
        for i, uri in enumerate([values] if isinstance(values, str) else values):
            if uri.startswith("data:"):
                path = directory / (name or f"image-{i}.png")
                path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
                log.info("wrote %s", path)
                uri = str(path)
            paths.append(uri)
        shown[field] = paths[0] if isinstance(values, str) else paths
    if "images" in shown:
        shown["image_url"] = shown["images"][0]
    return shown
