"""Result delivery: inline base64 data URIs, or uploads to S3-compatible storage with presigned URLs.

Uploads use boto3 directly (runpod's rp_upload labels .mp4 as image/mp4 and silently writes
to a local folder when the bucket is not fully configured). Each object lands under a key
holding the job id, with its real Content-Type. A failed upload is retried with backoff;
if it still fails the result comes back inline with a warning when it fits RunPod's payload
limit, otherwise the job fails with the cause. Credentials never reach a message or a log.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from settings import Bucket
from video_utils import data_uri

log = logging.getLogger("worker")
# RunPod caps job payloads (10 MB on /run, 20 MB on /runsync); inline results stay under it.
MAX_INLINE_CHARS = 10_000_000


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
    config = Config(signature_version="s3v4", retries={"max_attempts": 1, "mode": "standard"},
                    connect_timeout=5, read_timeout=30, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=bucket.endpoint_url, aws_access_key_id=bucket.access_key_id,
                        aws_secret_access_key=bucket.secret_access_key, config=config,
                        region_name="us-east-1")


def upload(artifacts: list[Artifact], job_id: str, bucket: Bucket, attempts: int = 3,
           backoff_s: float = 1.0) -> list[str]:
    """Upload each artifact under '<job id>/<file>' and return presigned GET URLs, retrying failures."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client(bucket)
    # A random part keeps retries of the same job id (RunPod may re-run a job) from overwriting.
    prefix = f"{job_id}/{uuid.uuid4().hex[:8]}"
    urls = []
    for artifact in artifacts:
        key = f"{prefix}/{artifact.filename}"
        for attempt in range(1, attempts + 1):
            try:
                client.put_object(Bucket=bucket.name, Key=key, Body=artifact.data, ContentType=artifact.mime)
                break
            except (BotoCoreError, ClientError) as err:
                cause = _scrub(_describe(err), bucket)
                if attempt == attempts:
                    raise UploadFailed(cause) from None
                log.warning("upload of %s failed (%s); attempt %d/%d", key, cause, attempt, attempts)
                time.sleep(backoff_s * 2 ** (attempt - 1))
        urls.append(client.generate_presigned_url("get_object", Params={"Bucket": bucket.name, "Key": key},
                                                  ExpiresIn=bucket.url_expiry_s))
    return urls


def _describe(err: Exception) -> str:
    response = getattr(err, "response", None)
    if response and "Error" in response:
        code = response["Error"].get("Code", "")
        return f"{code}: {response['Error'].get('Message', '')}".strip(": ")
    return type(err).__name__ + (f": {err}" if str(err) else "")


def deliver(artifacts: list[Artifact], job_id: str, bucket: Bucket | None, output: str,
            attempts: int = 3, backoff_s: float = 1.0) -> tuple[list[str], list[str]]:
    """Return (one URL or data URI per artifact, warnings) according to the request's `output`."""
    if bucket is None or output == "base64":
        return [data_uri(a.data, a.mime) for a in artifacts], []
    try:
        return upload(artifacts, job_id, bucket, attempts=attempts, backoff_s=backoff_s), []
    except UploadFailed as err:
        inline = [data_uri(a.data, a.mime) for a in artifacts]
        size = sum(len(uri) for uri in inline)
        if size <= MAX_INLINE_CHARS:
            log.error("upload failed after %d attempts (%s); returning the result inline", attempts, err)
            return inline, [f"Upload to bucket '{bucket.name}' failed after {attempts} attempts ({err}); "
                            f"the result is returned inline as base64 instead."]
        raise DeliveryError(f"Upload to bucket '{bucket.name}' failed after {attempts} attempts ({err}) and the "
                            f"result ({size:,} characters as base64) exceeds the {MAX_INLINE_CHARS:,}-character "
                            f"inline limit; fix the bucket settings or ask for a smaller output.") from None
