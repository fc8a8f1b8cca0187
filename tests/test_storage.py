"""Results to S3-compatible storage, proven against a real S3 HTTP server (moto's ThreadedMotoServer).

Nothing here mocks boto3: the worker talks HTTP to a local S3 server, and the returned presigned
URLs are downloaded with plain `requests.get`, as a user's client would.
"""

from __future__ import annotations

import io
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
import numpy as np
import pytest
import requests
from conftest import ROOT, decode_data_uri, free_port, png_b64
from media import probe_mp4
from moto.server import ThreadedMotoServer
from PIL import Image

import storage
import worker
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


def limit_words(chars: int) -> str:
    """The words naming the inline limit, as a regex."""
    return (rf"the {chars:,}-character inline limit \(MAX_INLINE_MB={chars / 1e6:g}; RunPod carries 10 MB on /run and "
            rf"20 MB on /runsync\)")


NO_BUCKET = (r"configure a bucket \(BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY\) to receive "
             r"it as a URL")
WITH_BUCKET = "ask for output 'auto' to receive it as a URL from the configured bucket"


def test_a_video_over_the_inline_limit_comes_back_re_encoded_smaller_with_a_warning(s3, use_bucket, run_job):
    """RunPod drops a payload over its limit: a finished video is re-encoded to fit rather than lost."""
    job = {**VIDEO, "num_frames": 9, "image_url": png_b64()}
    full = run_job(job)  # the default limit (10 MB): the CRF 18 video as it is
    assert "warnings" not in full and len(full["video"]) > 10_000, len(full["video"])
    use_bucket({"MAX_INLINE_MB": "0.008"})  # no bucket: inline
    result = run_job(job)
    assert len(result["video"]) <= 8_000
    video = probe_mp4(decode_data_uri(result["video"], "video/mp4"))
    assert (video["frames"], video["fps"], video["width"], video["height"]) == (9, 8, 64, 64)
    assert video["codec"].startswith("h264") and video["pix_fmt"].startswith("yuv420p")
    assert video["boxes"].index("moov") < video["boxes"].index("mdat")  # still plays while downloading
    assert (result["num_frames"], result["fps"]) == (9, 8)
    assert len(result["warnings"]) == 1 and re.fullmatch(
        rf"The result took {len(full['video']):,} characters as base64, over {limit_words(8_000)}, so the video was "
        rf"re-encoded at \d+ kbit/s \({len(result['video']):,} characters\); {NO_BUCKET}, at full quality\.",
        result["warnings"][0]), result["warnings"]
    # With a bucket, output 'base64' is held to the same limit; the fix is then to ask for a URL.
    use_bucket(bucket_env(s3.endpoint, MAX_INLINE_MB="0.008"))
    result = run_job({**job, "output": "base64"}, job_id="vid-b64-too-big")
    assert len(result["video"]) <= 8_000 and result["warnings"][0].endswith(f"; {WITH_BUCKET}, at full quality.")
    assert not [k for k in s3.keys() if k.startswith("vid-b64-too-big/")]  # base64 asked for: nothing uploaded


def test_images_over_the_inline_limit_come_back_as_jpeg_with_a_warning(use_bucket, run_job):
    png = run_job({**IMAGE, "num_images": 2})
    use_bucket({"MAX_INLINE_MB": "0.03"})
    result = run_job({**IMAGE, "num_images": 2})
    assert sum(len(uri) for uri in result["images"]) <= 30_000 and result["image_url"] == result["images"][0]
    pictures = [Image.open(io.BytesIO(decode_data_uri(uri, "image/jpeg"))) for uri in result["images"]]
    assert [(p.format, p.size) for p in pictures] == [("JPEG", (128, 128))] * 2
    # The same pictures: the JPEGs differ from the PNGs by compression noise only.
    for picture, uri in zip(pictures, png["images"], strict=True):
        original = np.asarray(Image.open(io.BytesIO(decode_data_uri(uri, "image/png"))), dtype=np.int16)
        assert np.abs(np.asarray(picture.convert("RGB"), dtype=np.int16) - original).mean() < 20
    size = sum(len(uri) for uri in png["images"])
    assert len(result["warnings"]) == 1 and re.fullmatch(
        rf"The result took {size:,} characters as base64, over {limit_words(30_000)}, so the 2 images are returned as "
        rf"JPEG at quality (90|75) \([\d,]+ characters\); {NO_BUCKET}, at full quality\.", result["warnings"][0])


def test_a_result_that_cannot_be_made_to_fit_inline_is_an_error_naming_the_limit(use_bucket, run_job):
    use_bucket({"MAX_INLINE_MB": "0.01"})  # two 128x128 images still take ~15,000 characters as JPEG
    result = run_job({**IMAGE, "num_images": 2})
    assert list(result) == ["error"], result
    assert re.fullmatch(rf"The result took [\d,]+ characters as base64, over {limit_words(10_000)}, and as JPEG at "
                        rf"quality 75 it still took [\d,]+; {NO_BUCKET}, or ask for fewer or smaller images\.",
                        result["error"]), result["error"]
    assert "video" in run_job({**VIDEO, "image_url": png_b64()})  # the next job succeeds


def test_a_result_too_large_for_the_inline_limit_at_any_quality_is_refused_before_generating(use_bucket, run_job,
                                                                                             tiny_models):
    use_bucket({"MAX_INLINE_MB": "0.002"})
    calls = []
    wan, _ = tiny_models.model("video")
    hook = wan.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = run_job({**VIDEO, "num_frames": 9, "image_url": png_b64()})
    finally:
        hook.remove()
    assert result == {"error": "Fields num_frames=9, height=64, width=64 make a video too large for the 2,000-"
                               "character inline limit (MAX_INLINE_MB=0.002; RunPod carries 10 MB on /run and 20 MB on "
                               "/runsync): it leaves 0.026 bits per pixel of each frame where H.264 needs at least "
                               "0.05; configure a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
                               "BUCKET_SECRET_ACCESS_KEY) to receive it as a URL, or ask for fewer frames or a smaller "
                               "size."}
    assert calls == []
    result = run_job({**IMAGE, "num_images": 4, "height": 256, "width": 256})
    assert result["error"].startswith("Fields num_images x height x width ask for 262,144 pixels, too many for the "
                                      "2,000-character inline limit"), result


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
    finish = worker.Mp4Stream.finish

    def encode_then_stop(stream):
        doomed.stop()
        return finish(stream)

    monkeypatch.setattr(worker.Mp4Stream, "finish", encode_then_stop)
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


def test_failed_upload_too_large_to_inline_comes_back_smaller_or_is_an_error_naming_the_cause(s3, use_bucket,
                                                                                            run_job):
    failed = (r"Upload to bucket 'no-such-bucket' failed after 2 attempts \(NoSuchBucket: The specified bucket does "
              r"not exist\)")
    use_bucket(bucket_env(s3.endpoint, BUCKET_NAME="no-such-bucket", MAX_INLINE_MB="0.03"))
    result = run_job({**IMAGE, "num_images": 2})
    assert [uri[:23] for uri in result["images"]] == ["data:image/jpeg;base64,"] * 2
    assert len(result["warnings"]) == 2 and re.fullmatch(
        failed + "; the result is returned inline as base64 instead.", result["warnings"][0]), result["warnings"]
    assert result["warnings"][1].endswith("; fix the bucket settings to receive it as a URL, at full quality.")
    use_bucket(bucket_env(s3.endpoint, BUCKET_NAME="no-such-bucket", MAX_INLINE_MB="0.001"))
    result = run_job({**IMAGE, "num_images": 1})
    assert list(result) == ["error"], result
    assert re.fullmatch(failed + rf", and the result took [\d,]+ characters as base64, over {limit_words(1_000)}, "
                        r"and as JPEG at quality 75 it still took [\d,]+; fix the bucket settings to receive it as a "
                        r"URL, or ask for fewer or smaller images\.", result["error"]), result["error"]
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

    use_bucket(bucket_env(s3.endpoint, BUCKET_NAME="no-such-bucket", MAX_INLINE_MB="0.001"))
    assert run_job(job)["error"].startswith("Upload to bucket 'no-such-bucket' failed")  # upload failed, re-encoded
    # A disk that fills mid-encode leaves nothing either: test_folders.
    assert os.listdir(tmp) == []
