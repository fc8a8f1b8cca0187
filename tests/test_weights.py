"""A Hub deploy with its defaults: empty MODEL_DIR, no volume. The worker (started as the Dockerfile starts it)
fetches the weights once from a stand-in hub on 127.0.0.1 (HF_ENDPOINT), logging progress; a second start
finds them; with WEIGHTS_DOWNLOAD=0, or a model the hub lacks, the job's error names the model, where the
worker looked and the fix; RunPod's cached-model folder is found whatever its letter case."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import ROOT, ApiServer, png_b64
from media import probe_mp4

import weights
from settings import DEFAULT_WAN_MODEL_ID

JOB = {"input": {"mode": "video", "prompt": "a boat drifts", "image_url": png_b64(), "height": 64, "width": 64,
                 "num_frames": 9, "num_inference_steps": 2, "fps": 8}}
CHUNK, CHUNK_PAUSE_S = 4096, 0.1  # the stand-in sends 40 KB/s a file, so a fetch lasts long enough to report


class StandInHub(ThreadingHTTPServer):
    """The Hugging Face endpoints snapshot_download calls, serving local folders as repositories:
    GET /api/models/{repo}[/revision/{rev}] (sha, siblings with sizes), GET /api/models/{repo}/tree/{rev}
    and HEAD/GET /{repo}/resolve/{rev}/{file} (X-Repo-Commit, ETag, Content-Length)."""

    daemon_threads = True

    def __init__(self, repos: dict[str, Path], claimed_sizes: dict[str, int] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _HubRequest)
        self.repos = repos
        self.claimed_sizes = claimed_sizes or {}  # repo -> the size model info gives each of its files
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def files(self, repo: str) -> dict[str, Path]:
        root = self.repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def repo_requests(self) -> list[str]:
        """Requests about repositories (huggingface_hub also asks the endpoint for its list of AI agents)."""
        prefixes = ("/api/models/", *(f"/{repo}/" for repo in self.repos))
        return [r for r in self.requests if r.split(" ", 1)[1].startswith(prefixes)]

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()


class _HubRequest(BaseHTTPRequestHandler):
    server: StandInHub

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def log_message(self, *args: object) -> None:
        pass  # keep the test output clean; the server records its requests instead

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(f"{self.command} {path}")
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo, rest = "/".join(parts[:2]), parts[2:]
        if repo not in self.server.repos:
            self._send(404, json.dumps({"error": "Repository not found"}).encode(), {"X-Error-Code": "RepoNotFound"})
        elif api and rest[:1] == ["tree"]:
            self._json([{"type": "file", "path": name, "size": f.stat().st_size, "oid": _git_oid(f)}
                        for name, f in self.server.files(repo).items()])
        elif api:
            self._json({"id": repo, "sha": self.server.commit(repo), "siblings": [
                {"rfilename": name, "size": self.server.claimed_sizes.get(repo, f.stat().st_size)}
                for name, f in self.server.files(repo).items()]})
        elif rest[:1] == ["resolve"] and "/".join(rest[2:]) in self.server.files(repo):
            self._file(repo, self.server.files(repo)["/".join(rest[2:])], body)
        else:
            self._send(404, b"", {"X-Error-Code": "EntryNotFound"})

    def _json(self, value: object) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _file(self, repo: str, file: Path, body: bool) -> None:
        data = file.read_bytes()
        self.send_response(200)
        for name, value in {"Content-Length": str(len(data)), "X-Repo-Commit": self.server.commit(repo),
                            "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}.items():
            self.send_header(name, value)
        self.end_headers()
        for start in range(0, len(data) if body else 0, CHUNK):
            self.wfile.write(data[start:start + CHUNK])
            time.sleep(CHUNK_PAUSE_S)

    def _send(self, status: int, data: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in (headers | {"Content-Length": str(len(data))}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _git_oid(file: Path) -> str:
    data = file.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def hub(tiny_dir: Path) -> Iterator[StandInHub]:
    repos = {weights.REAL_MODELS[name]["repo_id"]: tiny_dir / name for name in weights.REAL_MODELS}
    server = StandInHub(repos | {"someone/huge-model": tiny_dir / "wan-i2v"}, {"someone/huge-model": 10**15})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def start_worker(hub: StandInHub, tmp_path: Path, hf_home: Path, extra: dict[str, str] | None = None):
    """`python handler.py --test_input JOB` as the image runs it, on a Hub deploy's defaults: nothing baked,
    no volume, no model variables set; the hub is the stand-in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_", "HF_", "SDXL_", "WAN_"))}
    (tmp_path / "empty").mkdir(exist_ok=True)
    env |= {"MODEL_DIR": str(tmp_path / "empty"), "HF_HOME": str(hf_home), "HF_ENDPOINT": hub.url,
            "LOCAL_OUTPUT_DIR": str(tmp_path / "out"), **(extra or {})}
    hub.requests.clear()
    out = subprocess.run([sys.executable, "handler.py", "--test_input", json.dumps(JOB)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    return out, out.stdout + out.stderr


def test_a_hub_default_worker_fetches_the_weights_once_with_progress(hub, tiny_dir, tmp_path):
    hf_home = tmp_path / "hf"
    out, log = start_worker(hub, tmp_path, hf_home)
    assert out.returncode == 0, log[-3000:]
    video = probe_mp4((tmp_path / "out" / "local_test" / "video.mp4").read_bytes())
    assert (video["frames"], video["width"], video["height"]) == (9, 64, 64)
    # Progress in the log: a first line with the size, lines on the way, a last one with the time.
    files = [f for f in (tiny_dir / "wan-i2v").rglob("*") if f.is_file()]
    size = f"{sum(f.stat().st_size for f in files) / 1e6:.1f}"
    repo = re.escape(DEFAULT_WAN_MODEL_ID)
    first = rf"fetching {repo} \({len(files)} files, {size} MB\) into {re.escape(str(hf_home / 'hub'))}"
    assert re.search(first, log), log[-3000:]
    percents = [int(p) for p in re.findall(rf"fetching {repo}: [\d.]+/{size} MB \((\d+)%\), [\d.]+ MB/s", log)]
    assert any(0 < p < 100 for p in percents), log[-3000:]
    assert re.search(rf"fetched {repo}: {size} MB in [\d.]+ s", log), log[-3000:]
    # The bytes on disk are the hub's, in the HF cache's layout.
    snapshot = hf_home / "hub" / "models--Wan-AI--Wan2.1-I2V-14B-480P-Diffusers" / "snapshots" / hub.commit(
        DEFAULT_WAN_MODEL_ID)
    weights_file = "transformer/diffusion_pytorch_model.safetensors"
    assert (snapshot / weights_file).read_bytes() == (tiny_dir / "wan-i2v" / weights_file).read_bytes()

    out, log = start_worker(hub, tmp_path, hf_home)  # the next worker finds them: no fetch, not one request
    assert out.returncode == 0, log[-3000:]
    assert probe_mp4((tmp_path / "out" / "local_test" / "video.mp4").read_bytes())["frames"] == 9
    assert not re.search(f"fetch(ing|ed) {repo}", log) and hub.repo_requests() == []


def test_weights_download_0_names_the_model_where_it_looked_and_the_fix(hub, tmp_path):
    out, log = start_worker(hub, tmp_path, tmp_path / "hf", {"WEIGHTS_DOWNLOAD": "0"})
    assert out.returncode == 1 and hub.repo_requests() == []
    error = (f"The weights of {DEFAULT_WAN_MODEL_ID} (WAN_MODEL_ID) are not on this worker (looked in "
             f"{tmp_path / 'empty' / 'wan-i2v'}, /runpod-volume/huggingface-cache/hub, {tmp_path / 'hf' / 'hub'}, "
             f"{Path.home() / '.cache' / 'huggingface' / 'hub'}) and WEIGHTS_DOWNLOAD=0 forbids fetching them; set "
             f"the endpoint's Model to {DEFAULT_WAN_MODEL_ID}, mount a network volume holding it, set "
             f"WEIGHTS_DOWNLOAD=1, or bake it into the image with BAKE_WEIGHTS=wan.")
    assert error in log, log[-3000:]


def test_a_model_the_hub_lacks_or_too_big_for_the_disk_fails_its_job_and_the_worker_serves_on(hub, tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    env = {"MODEL_DIR": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url,
           "SDXL_VAE_ID": "someone/no-such-model", "WAN_MODEL_ID": "someone/huge-model"}
    server = ApiServer(env, tmp_path / "server.log")
    try:
        hub.requests.clear()
        image = server.runsync({"prompt": "a lighthouse", "height": 128, "width": 128})
        assert len(hub.repo_requests()) == 1  # asked once: a repository that does not exist is not retried
        video = server.runsync(JOB["input"])
        assert server.proc.poll() is None
    finally:
        server.stop()
    def sentence(repo: str, env_var: str, reason: str) -> str:
        return (rf"The weights of {repo} \({env_var}\) are not on this worker \(looked in [^)]*\) and fetching them "
                rf"failed \({reason}\); set the endpoint's Model to {repo}, or mount a network volume holding it\.")

    assert re.fullmatch(sentence("someone/no-such-model", "SDXL_VAE_ID", "RepositoryNotFoundError: [^)]*"),
                        image["error"]), image
    # The stand-in says each file is 1 PB: the worker refuses before fetching a byte.
    claimed = len([f for f in (tiny_dir / "wan-i2v").rglob("*") if f.is_file()]) * 10**15 / 1e9
    no_room = rf"NotEnoughDisk: {claimed:.1f} GB needed, [\d.]+ [GM]B free in {re.escape(str(tmp_path / 'hf' / 'hub'))}"
    assert re.fullmatch(sentence("someone/huge-model", "WAN_MODEL_ID", no_room), video["error"]), video
    assert not (tmp_path / "hf" / "hub" / "models--someone--huge-model" / "blobs").exists()


def test_runpods_cached_model_is_found_whatever_its_letter_case(tiny_dir, tmp_path):
    # RunPod puts the endpoint's Model at /runpod-volume/huggingface-cache/hub/models--ORG--NAME/snapshots/HASH,
    # sometimes lowercased; huggingface_hub's own lookup is case-sensitive.
    snapshot = tmp_path / "huggingface-cache" / "hub" / "models--wan-ai--wan2.1-i2v-14b-480p-diffusers" / \
        "snapshots" / "0123abcd"
    shutil.copytree(tiny_dir / "wan-i2v", snapshot)
    assert weights.local_folder("wan-i2v", DEFAULT_WAN_MODEL_ID, download=False, volume=tmp_path) == str(snapshot)
