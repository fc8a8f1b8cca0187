"""Results to S3-compatible storage, proven against a real S3 HTTP server (moto's ThreadedMotoServer).

Nothing here mocks boto3: the worker talks HTTP to a local S3 server, and the returned presigned
URLs are downloaded with plain `requests.get`, as a user's client would.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import requests
from conftest import ROOT, decode_data_uri, free_port, png_b64
from media import probe_mp4
from moto.server import ThreadedMotoServer

import handler
import storage
from settings import Bucket, SettingsError, load_settings

BUCKET = "results"
ACCESS_KEY = "AKIDLEAKCHECK0042"
SECRET = "sEcReT-must-never-leak-7f3a9c"
IMAGE = {"prompt": "a red car", "height": 128, "width": 128, "num_inference_steps": 2,
         "refiner_inference_steps": 4, "seed": 5}
VIDEO = {"mode": "video", "prompt": "a cat walks", "height": 64, "width": 64, "num_frames": 5,
         "num_inference_steps": 2, "fps": 8, "seed": 7}
PARTIAL = "S3 output is half configured: {present} set but {missing} missing; set all three or none."
RETRY_LINE = re.compile(r"upload of \S+ failed \(.+\); attempt 1/2")


class S3Server:
    """moto's S3 over HTTP on a free localhost port, with a few helpers for the tests."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.s3 = self.client("s3")
        self.s3.create_bucket(Bucket=BUCKET)

    def client(self, service: str, key: str = "admin", secret: str = "admin"):
        return boto3.client(service, endpoint_url=self.endpoint, aws_access_key_id=key,
                            aws_secret_access_key=secret, region_name="us-east-1")

    def keys(self, bucket: str = BUCKET) -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]

    def require_auth(self, on: bool) -> None:
        """moto checks SigV4 signatures against its IAM keys from the next request on (or stops)."""
        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if on else b"inf", timeout=5)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3() -> S3Server:
    server = S3Server()
    yield server
    server.stop()


def bucket_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"BUCKET_ENDPOINT_URL": endpoint, "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
            "BUCKET_SECRET_ACCESS_KEY": SECRET, "BUCKET_NAME": BUCKET, **extra}


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(storage, "UPLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "UPLOAD_BACKOFF_S", 0.01)


@pytest.fixture()
def current(worker) -> dict:
    """The Worker that run_job sends jobs to: the session's (no bucket) until use_bucket picks another."""
    return {"worker": worker}


@pytest.fixture()
def use_bucket(current, make_worker):
    """Jobs of this test go to a Worker configured from tiny_env plus BUCKET_* variables (same models)."""

    def configure(env: dict[str, str]):
        current["worker"] = make_worker(env)
        return current["worker"].settings

    return configure


@pytest.fixture()
def run_job(current):
    def run(job_input: dict, job_id: str = "test-job") -> dict:
        return current["worker"].run({"id": job_id, "input": job_input})

    return run


@pytest.fixture()
def uploaded(monkeypatch):
    """Records the artifacts the worker hands to storage.upload (the bytes it generated)."""
    seen: list[storage.Artifact] = []
    real = storage.upload

    def spy(artifacts, *args, **kwargs):
        seen.extend(artifacts)
        return real(artifacts, *args, **kwargs)

    monkeypatch.setattr(storage, "upload", spy)
    return seen


def download(url: str) -> requests.Response:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, (response.status_code, response.text[:300])
    return response


# ---------------------------------------------------------------------------------------------
# Uploads that work
# ---------------------------------------------------------------------------------------------
def test_image_job_uploads_pngs_whose_urls_download_the_exact_bytes(s3, use_bucket, run_job, uploaded):
    use_bucket(bucket_env(s3.endpoint))
    result = run_job({**IMAGE, "num_images": 2}, job_id="img-job-1")
    assert "error" not in result and "warnings" not in result, result
    assert len(result["images"]) == 2 and result["image_url"] == result["images"][0]
    assert [a.mime for a in uploaded] == ["image/png", "image/png"]
    for url, artifact in zip(result["images"], uploaded, strict=True):
        assert urlparse(url).path.startswith(f"/{BUCKET}/img-job-1/"), url
        response = download(url)
        assert response.headers["Content-Type"] == "image/png"
        assert response.content == artifact.data
        assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert len([k for k in s3.keys() if k.startswith("img-job-1/")]) == 2
    assert "upload_s" in result["timings"]
    assert SECRET not in json.dumps(result)


def test_video_job_uploads_an_mp4_whose_url_downloads_the_exact_bytes(s3, use_bucket, run_job, uploaded):
    use_bucket(bucket_env(s3.endpoint, BUCKET_URL_EXPIRY_S="900"))
    result = run_job({**VIDEO, "image_url": png_b64()}, job_id="vid-job-1")
    assert "error" not in result and "warnings" not in result, result
    url = result["video"]
    assert urlparse(url).path.startswith(f"/{BUCKET}/vid-job-1/") and url.split("?")[0].endswith("/video.mp4")
    assert parse_qs(urlparse(url).query)["X-Amz-Expires"] == ["900"]  # BUCKET_URL_EXPIRY_S
    response = download(url)
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.content == uploaded[0].data
    video = probe_mp4(response.content)
    assert (video["frames"], video["width"], video["height"]) == (5, 64, 64)


def test_base64_requested_while_a_bucket_is_configured_comes_back_inline(s3, use_bucket, run_job):
    use_bucket(bucket_env(s3.endpoint))
    result = run_job({**VIDEO, "image_url": png_b64(), "output": "base64"}, job_id="vid-b64")
    assert "error" not in result and "warnings" not in result, result
    assert probe_mp4(decode_data_uri(result["video"], "video/mp4"))["frames"] == 5
    assert not [k for k in s3.keys() if k.startswith("vid-b64/")]  # nothing uploaded
    assert "upload_s" not in result["timings"]


def test_s3_requested_without_a_bucket_is_a_clear_error(run_job):
    result = run_job({**IMAGE, "output": "s3"})
    assert result == {"error": "Field 'output' is 's3' but no bucket is configured (BUCKET_ENDPOINT_URL, "
                               "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY); ask for 'auto' or 'base64'."}


def test_an_inline_result_over_the_limit_is_an_error_naming_the_size_and_the_fix(s3, use_bucket, run_job,
                                                                                 monkeypatch):
    """RunPod drops a payload over its limit; the worker says so instead of returning it to be lost."""
    monkeypatch.setattr(storage, "MAX_INLINE_CHARS", 1000)
    inline_limit = (r"The result is [\d,]+ characters as base64, over the 1,000 that RunPod carries inline for /run "
                    r"\(20 MB for /runsync\); configure a bucket \(BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                    r"BUCKET_SECRET_ACCESS_KEY\) to receive it as a URL, or ask for a smaller output\.")
    result = run_job({**IMAGE, "num_images": 1})  # no bucket configured
    assert list(result) == ["error"] and re.fullmatch(inline_limit, result["error"]), result
    use_bucket(bucket_env(s3.endpoint))
    result = run_job({**VIDEO, "image_url": png_b64(), "output": "base64"}, job_id="vid-b64-too-big")
    with_bucket = inline_limit.replace(r"configure a bucket \(BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                                       r"BUCKET_SECRET_ACCESS_KEY\) to receive it as a URL",
                                       "ask for output 'auto' to receive it as a URL from the configured bucket")
    assert with_bucket != inline_limit
    assert list(result) == ["error"] and re.fullmatch(with_bucket, result["error"]), result
    assert not [k for k in s3.keys() if k.startswith("vid-b64-too-big/")]  # base64 asked for: nothing uploaded


def test_video_job_through_the_local_api_server_lands_in_the_bucket(s3, start_api):
    api = start_api(bucket_env(s3.endpoint))
    output = api.runsync({**VIDEO, "image_url": png_b64()})
    assert output["status"] == "COMPLETED", output
    result = output["output"]
    assert "warnings" not in result, result
    response = download(result["video"])
    assert response.headers["Content-Type"] == "video/mp4"
    assert (probe_mp4(response.content)["frames"]) == 5
    key = urlparse(result["video"]).path.removeprefix(f"/{BUCKET}/")
    assert key.startswith(f"{output['id']}/")  # the key holds RunPod's job id
    assert s3.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == response.content
    assert SECRET not in api.log() and SECRET not in json.dumps(output)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
FULL = bucket_env("http://127.0.0.1:9000")


@pytest.mark.parametrize("present", [
    ("BUCKET_ENDPOINT_URL",), ("BUCKET_ACCESS_KEY_ID",), ("BUCKET_SECRET_ACCESS_KEY",),
    ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID"), ("BUCKET_ENDPOINT_URL", "BUCKET_SECRET_ACCESS_KEY"),
    ("BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"),
])
def test_partial_bucket_configuration_is_refused(present):
    missing = [v for v in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")
               if v not in present]
    with pytest.raises(SettingsError) as err:
        load_settings({name: FULL[name] for name in present})
    assert str(err.value) == PARTIAL.format(present=", ".join(present), missing=", ".join(missing))
    assert SECRET not in str(err.value)


def test_partial_bucket_configuration_stops_the_worker_at_start_up(tiny_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_"))}
    env.update(tiny_env, BUCKET_ENDPOINT_URL="http://127.0.0.1:9000", BUCKET_SECRET_ACCESS_KEY=SECRET)
    out = subprocess.run([sys.executable, "handler.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    message = PARTIAL.format(present="BUCKET_ENDPOINT_URL, BUCKET_SECRET_ACCESS_KEY", missing="BUCKET_ACCESS_KEY_ID")
    assert message in out.stdout + out.stderr
    assert SECRET not in out.stdout + out.stderr


@pytest.mark.parametrize(("env", "expected"), [
    ({"BUCKET_ENDPOINT_URL": "https://my-bucket.s3.eu-west-1.amazonaws.com"},  # RunPod's documented form
     ("https://s3.eu-west-1.amazonaws.com", "my-bucket", "eu-west-1")),
    ({"BUCKET_ENDPOINT_URL": "https://s3.us-west-004.backblazeb2.com/renders"},
     ("https://s3.us-west-004.backblazeb2.com", "renders", "us-west-004")),
    ({"BUCKET_ENDPOINT_URL": "https://nyc3.digitaloceanspaces.com", "BUCKET_NAME": "clips"},
     ("https://nyc3.digitaloceanspaces.com", "clips", "nyc3")),
    ({"BUCKET_ENDPOINT_URL": "http://127.0.0.1:9000/", "BUCKET_NAME": "out", "BUCKET_REGION": "auto"},
     ("http://127.0.0.1:9000", "out", "auto")),
])
def test_bucket_endpoint_forms(env, expected):
    bucket = load_settings({"BUCKET_ACCESS_KEY_ID": ACCESS_KEY, "BUCKET_SECRET_ACCESS_KEY": SECRET, **env}).bucket
    assert (bucket.endpoint_url, bucket.name, bucket.region) == expected
    assert SECRET not in repr(bucket) and SECRET not in repr(load_settings({**FULL, "BUCKET_NAME": "", **env}))


@pytest.mark.parametrize(("env", "message"), [
    ({"BUCKET_NAME": ""}, "BUCKET_NAME is not set and BUCKET_ENDPOINT_URL names no bucket; set BUCKET_NAME."),
    ({"BUCKET_URL_EXPIRY_S": "604801"},
     "BUCKET_URL_EXPIRY_S must be at most 604800 (7 days, the S3 limit), got 604801."),
    ({"BUCKET_URL_EXPIRY_S": "soon"}, "BUCKET_URL_EXPIRY_S must be a whole number, got 'soon'."),
    ({"BUCKET_ENDPOINT_URL": "s3.example.com"}, "BUCKET_ENDPOINT_URL must be an http(s) URL, got 's3.example.com'."),
    ({"BUCKET_ENDPOINT_URL": "https://s3.example.com/a"},
     "BUCKET_ENDPOINT_URL names bucket 'a' but BUCKET_NAME is 'results'; set one of them, or both to the same "
     "bucket."),
])
def test_bucket_settings_errors(env, message):
    with pytest.raises(SettingsError) as err:
        load_settings({**FULL, **env})
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------
# Failures: retried, then inline with a warning, or an error naming the cause; never a leak
# ---------------------------------------------------------------------------------------------
def _break_mid_run(s3, use_bucket, monkeypatch):
    """A second S3 server that is up when the job starts and goes down after generation."""
    doomed = S3Server()
    use_bucket(bucket_env(doomed.endpoint))
    finish = handler.Mp4Stream.finish

    def encode_then_stop(stream):
        doomed.stop()
        return finish(stream)

    monkeypatch.setattr(handler.Mp4Stream, "finish", encode_then_stop)
    return (r"EndpointConnectionError: Could not connect to the endpoint URL: "
            rf"\"{re.escape(doomed.endpoint)}/{BUCKET}/{{job}}/[0-9a-f]{{{{8}}}}/video\.mp4\"")


def _wrong_secret(s3, use_bucket, monkeypatch):
    """Real signature checking: moto knows the key id but the secret is wrong."""
    iam = s3.client("iam")
    iam.create_user(UserName="worker")
    iam.put_user_policy(UserName="worker", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="worker")["AccessKey"]
    s3.require_auth(True)
    # The right secret is accepted, so what follows fails on the secret alone.
    right = Bucket(endpoint_url=s3.endpoint, access_key_id=key["AccessKeyId"],
                   secret_access_key=key["SecretAccessKey"], name=BUCKET, url_expiry_s=60)
    assert storage.upload([storage.Artifact(b"ok", "text/plain", "probe.txt")], "auth-probe", right)
    use_bucket(bucket_env(s3.endpoint, BUCKET_ACCESS_KEY_ID=key["AccessKeyId"]))
    return ("SignatureDoesNotMatch: The request signature we calculated does not match the signature you "
            "provided. Check your key and signing method.")


def _missing_bucket(s3, use_bucket, monkeypatch):
    use_bucket(bucket_env(s3.endpoint, BUCKET_NAME="no-such-bucket"))
    return "NoSuchBucket: The specified bucket does not exist"


@pytest.mark.parametrize("cause", [_break_mid_run, _wrong_secret, _missing_bucket],
                         ids=["server-stopped-mid-run", "wrong-secret", "missing-bucket"])
def test_failed_upload_returns_the_video_inline_with_a_warning(cause, s3, use_bucket, run_job, monkeypatch,
                                                               caplog, capfd):
    caplog.set_level(logging.DEBUG)  # botocore, urllib3 and the worker at their most talkative
    job = f"fallback-{cause.__name__.strip('_')}"
    try:
        reason = cause(s3, use_bucket, monkeypatch)
        result = run_job({**VIDEO, "image_url": png_b64()}, job_id=job)
    finally:
        s3.require_auth(False)
    assert "error" not in result, result
    assert probe_mp4(decode_data_uri(result["video"], "video/mp4"))["frames"] == 5  # nothing lost
    bucket = "no-such-bucket" if cause is _missing_bucket else BUCKET
    pattern = (rf"Upload to bucket '{bucket}' failed after 2 attempts \({reason.format(job=job)}\); "
               if cause is _break_mid_run else
               rf"Upload to bucket '{bucket}' failed after 2 attempts \({re.escape(reason)}\); ")
    assert len(result["warnings"]) == 1
    assert re.fullmatch(pattern + r"the result is returned inline as base64 instead\.", result["warnings"][0]), \
        result["warnings"]
    worker_log = [r.getMessage() for r in caplog.records if r.name == "worker"]
    assert any(RETRY_LINE.fullmatch(line) for line in worker_log), worker_log  # retried before giving up
    captured = capfd.readouterr()
    for text in (json.dumps(result), caplog.text, captured.out, captured.err):
        assert SECRET not in text
    assert ACCESS_KEY not in json.dumps(result) and ACCESS_KEY not in "\n".join(worker_log)


def test_failed_upload_too_large_to_inline_is_an_error_naming_the_cause(s3, use_bucket, run_job, monkeypatch):
    monkeypatch.setattr(storage, "MAX_INLINE_CHARS", 1000)
    use_bucket(bucket_env(s3.endpoint, BUCKET_NAME="no-such-bucket"))
    result = run_job({**IMAGE, "num_images": 1})
    assert list(result) == ["error"], result
    assert re.fullmatch(r"Upload to bucket 'no-such-bucket' failed after 2 attempts \(NoSuchBucket: The specified "
                        r"bucket does not exist\) and the result \([\d,]+ characters as base64\) exceeds the "
                        r"1,000-character inline limit; fix the bucket settings or ask for a smaller output\.",
                        result["error"]), result["error"]
    assert SECRET not in result["error"] and ACCESS_KEY not in result["error"]


def test_the_worker_log_keeps_base64_out_even_from_an_exception_that_quotes_a_payload(caplog):
    """What the worker adds to a failed job's log on RunPod is the traceback of an internal error (runpod logs
    no job body at its INFO level); an exception's text may quote the request, and PayloadFilter cuts it."""
    payload = png_b64(256, 256)  # ~260 KB as base64
    logger = logging.getLogger("worker.payload-test")
    logger.addFilter(storage.PayloadFilter())
    caplog.set_level(logging.INFO, logger="worker.payload-test")
    try:
        raise ValueError(f"cannot read data:image/png;base64,{payload}")
    except ValueError:
        logger.exception("job %s failed on %s", "job-1", payload)
    text = caplog.text
    assert not re.search(r"[A-Za-z0-9+/]{1000}", text), text[:300]
    cut = f"{payload[:40]}...({len(payload):,} base64 characters)"
    assert f"job job-1 failed on {cut}" in text and f"ValueError: cannot read data:image/png;base64,{cut}" in text


def test_upload_retries_with_growing_backoff(caplog):
    caplog.set_level(logging.WARNING, logger="worker")
    closed = Bucket(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id=ACCESS_KEY,
                    secret_access_key=SECRET, name=BUCKET, url_expiry_s=60)
    start = time.monotonic()
    with pytest.raises(storage.UploadFailed, match=r"^EndpointConnectionError: Could not connect"):
        storage.upload([storage.Artifact(b"x", "image/png", "a.png")], "retry", closed, attempts=3, backoff_s=0.2)
    assert time.monotonic() - start >= 0.2 + 0.4
    assert [r.getMessage()[-11:] for r in caplog.records] == ["attempt 1/3", "attempt 2/3"]


# ---------------------------------------------------------------------------------------------
# Temporary files
# ---------------------------------------------------------------------------------------------
def test_jobs_leave_no_temporary_files(s3, use_bucket, run_job, monkeypatch, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    use_bucket(bucket_env(s3.endpoint))
    job = {**VIDEO, "image_url": png_b64()}
    assert "video" in run_job(job)  # uploaded

    monkeypatch.setattr(storage, "MAX_INLINE_CHARS", 1000)
    use_bucket(bucket_env(s3.endpoint, BUCKET_NAME="no-such-bucket"))
    assert run_job(job)["error"].startswith("Upload to bucket 'no-such-bucket' failed")  # upload failed
    # A disk that fills mid-encode leaves nothing either: test_folders.
    assert os.listdir(tmp) == []
