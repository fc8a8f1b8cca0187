"""Shared fixtures: tiny random models built once per session, a worker on them (the same `Worker` and
`ModelHandler` that `python handler.py` builds), and a factory that starts the real local API server
(`python handler.py --rp_serve_api`)."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import download_weights  # noqa: E402
from model_handler import ModelHandler  # noqa: E402
from plan import decide  # noqa: E402
from settings import Settings, load_settings  # noqa: E402
from worker import Worker  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    download_weights.build_tiny(out)
    return out


@pytest.fixture(scope="session")
def tiny_env(tiny_dir: Path) -> dict[str, str]:
    """Environment pointing the worker at the tiny models (and nothing else configured)."""
    return {
        "SDXL_MODEL_ID": str(tiny_dir / "sdxl-base"),
        "SDXL_REFINER_ID": str(tiny_dir / "sdxl-refiner"),
        "SDXL_VAE_ID": str(tiny_dir / "sdxl-vae"),
        "WAN_MODEL_ID": str(tiny_dir / "wan-i2v"),
    }


@pytest.fixture(scope="session")
def tiny_settings(tiny_env: dict[str, str]) -> Settings:
    return load_settings(tiny_env)


@pytest.fixture(scope="session")
def tiny_models(tiny_settings: Settings) -> ModelHandler:
    """The worker's ModelHandler on the tiny models, shared by the session (models load once)."""
    return ModelHandler(decide(tiny_settings))


@pytest.fixture(scope="session")
def worker(tiny_settings: Settings, tiny_models: ModelHandler) -> Worker:
    return Worker(tiny_settings, tiny_models)


@pytest.fixture()
def run_job(worker: Worker):
    """Run one job through the worker, as RunPod's call of the handler does (models load once per session)."""
    def run(job_input: dict, job_id: str = "test-job") -> dict:
        return worker.run({"id": job_id, "input": job_input})

    return run


@pytest.fixture(scope="session")
def make_worker(tiny_env: dict[str, str], tiny_models: ModelHandler):
    """Factory: a Worker under other settings. Settings the models read (compile, dtypes, LoRAs) need
    `new_models=True`: the models then load again on their first job, as in a new worker process."""
    def make(extra_env: dict[str, str], new_models: bool = False) -> Worker:
        plan = decide(load_settings(tiny_env | extra_env))
        return Worker(plan.settings, ModelHandler(plan) if new_models else tiny_models)

    return make


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: tmpfs(size="8k", read_only=False) mounts a small tmpfs under tmp_path and returns its folder: a
    disk that fills, or refuses every write. Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped."""
    mounted: list[Path] = []

    def mount(size: str = "8k", read_only: bool = False) -> Path:
        path = tmp_path / f"disk-{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def png_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_b64(width: int = 64, height: int = 48, seed: int = 0) -> str:
    buf = io.BytesIO()
    png_image(width, height, seed).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_data_uri(uri: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix), uri[:60]
    return base64.b64decode(uri[len(prefix):])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process: get SIGTERM when pytest dies, so a killed run leaves no server behind."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ApiServer:
    """`python handler.py --rp_serve_api` in a subprocess, as a user would run it."""

    def __init__(self, env: dict[str, str], log_path: Path, ready_timeout_s: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_"))}
        full_env.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(self.port),
             "--rp_api_host", "127.0.0.1"],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + ready_timeout_s  # start-up (preloads, warm-ups) comes before the API
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"API server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/docs", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.5)
        raise RuntimeError(f"API server did not come up:\n{self.log()}")

    def runsync(self, job_input: object, timeout: float = 300) -> dict:
        response = requests.post(f"{self.url}/runsync", json={"input": job_input}, timeout=timeout)
        assert response.status_code == 200, (response.status_code, response.text[:500])
        return response.json()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def start_api(tiny_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: start_api(extra_env) -> running ApiServer; all are stopped at session end."""
    servers: list[ApiServer] = []

    def start(extra_env: dict[str, str] | None = None, ready_timeout_s: float = 120) -> ApiServer:
        log_path = tmp_path_factory.mktemp("api") / "server.log"
        server = ApiServer({**tiny_env, **(extra_env or {})}, log_path, ready_timeout_s)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def api(start_api) -> ApiServer:
    """One shared API server on the tiny models with default settings."""
    return start_api()
