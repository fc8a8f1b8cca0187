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
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import existing_part, folder_fault
from settings import Bucket, Settings
from video_utils import data_uri

log = logging.getLogger("worker")
# RunPod caps job payloads (10 MB on /run, 20 MB on /runsync); inline results stay under it.
MAX_INLINE_CHARS = 10_000_000
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


class DeliveryError(RuntimeError):
    """The result could be neither uploaded nor returned inline; the message names the cause."""


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


# ---------------------------------------------------------------------------------------------
# Local runs and the folders the worker writes
# ---------------------------------------------------------------------------------------------
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "video/mp4": "mp4"}
# Below this much free space a folder is reported at start-up as nearly full (a 480x832 81-frame MP4 is ~10 MB).
MIN_FREE_BYTES = 100 * 1000**2


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


def check_folders(settings: Settings, local_outputs: bool) -> list[str]:
    """One line for each folder the worker writes that cannot work or is nearly full: the start-up log's.

    Nothing is created: a folder that does not exist yet is judged by the nearest folder above it.
    `local_outputs`: this run saves results under LOCAL_OUTPUT_DIR (python handler.py, --test_input).
    """
    temp = tempfile.gettempdir()
    wanted = os.environ.get("TMPDIR") or temp
    # Python skips a TMPDIR it cannot write and takes the next candidate (/tmp, /var/tmp, the working folder).
    moved = f"temp files go to {temp!r} instead" if os.path.realpath(wanted) != os.path.realpath(temp) else ""
    folders = [("TMPDIR", wanted, moved or "videos cannot be encoded"),
               ("LORA_CACHE_DIR", settings.lora_cache_dir, "LoRA downloads will fail")]
    if settings.compile_cache_dir and (settings.wan_compile or settings.sdxl_compile):
        folders.append(("COMPILE_CACHE_DIR", settings.compile_cache_dir,
                        "compiled kernels are not kept for the next worker"))
    if local_outputs:
        folders.append(("LOCAL_OUTPUT_DIR", settings.local_output_dir, "local results cannot be saved"))
    return [line for setting, folder, loss in folders if (line := folder_problem(setting, folder, loss))]


def folder_problem(setting: str, folder: str, loss: str) -> str | None:
    """A sentence when `folder` (the value of `setting`) cannot take files or is nearly full, else None.

    `loss` says what fails meanwhile ("LoRA downloads will fail")."""
    path = existing_part(folder)
    where = f"{setting}={folder!r}"
    if not path.is_dir():
        return f"{where} is not a folder ({path} is a file), so {loss}; set {setting} to a folder."
    if not os.access(path, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "is not writable"
        inside = "" if str(path) == os.path.abspath(folder) else f" (its nearest existing folder, {str(path)!r})"
        return f"{where}{inside} {why}, so {loss}; set {setting} to a folder this worker can write."
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        return (f"The disk holding {where} has {free / 1e6:,.1f} MB free, so {loss} once it fills; free space there or "
                f"set {setting} to a folder on a larger disk.")
    return None
