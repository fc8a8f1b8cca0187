"""Several GPUs per worker: one Wan2.1 video spread over all of them with Ulysses context parallelism.

With NUM_GPUS=N above 1, `ModelHandler` calls `start(plan, wan)` once, at start-up, and holds the
`ParallelWan` it returns as its video model: the same `VideoModel` interface as `WanModel`. It
launches one follower process per extra GPU (ranks 1..N-1, `python -c "import parallel;
parallel.follower_main()"`) and joins them in torch.distributed (NCCL for the GPUs' tensors, gloo
for the small control messages; gloo alone on CPU). Rank 0 keeps running the RunPod handler. Each
video job is sent to every rank (the checked job and its first frame as PNG, not the request's
image data); every rank runs the ordinary `WanModel.generate` with the transformer in Ulysses
context parallelism (each GPU holds the whole model and computes attention for 1/N of the heads
over the whole sequence, the rest for 1/N of the tokens), and rank 0 encodes and delivers. Image
jobs run on rank 0 alone. Which setups can run at all is decided by plan.decide.

Keeping the ranks in step, so that a failure never hangs the worker:
- Every job ends with an exchange of one status per rank (ok, cancelled, or the error sentence),
  so a failure on any rank gives the job one clear error and every rank waits for the next job.
- The first transformer call of a job starts with the same exchange, so a rank that failed
  before it (fetching a LoRA, encoding the prompt) stops the others before they enter the
  transformer's collectives.
- Cancellation is collective: at every step end rank 0 shares whether the job was cancelled
  and all ranks stop together.
- A rank whose partners do not reach an exchange within a timeout, or a follower process that
  dies (rank 0's watchdog thread), takes the whole worker down with one log line and exit code 1,
  so RunPod restarts it; followers die with rank 0 (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import faulthandler
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import logs
from errors import GenerationError, InputError, JobCancelled, first_line
from models.base import Cancelled, Progress
from models.wan import Frames, WanModel
from plan import Plan
from schemas import VideoJob

log = logging.getLogger("worker")
ROOT = Path(__file__).resolve().parent
# How long a rank waits at a job's exchange for the others. They arrive within seconds of each other
# (the transformer's collectives keep them together); only a rank stuck in a collective never arrives.
STEP_TIMEOUT_S = 120.0
# Loading: the ranks read the weights at the same time, from the same disk.
LOAD_TIMEOUT_S = 1800.0
# The GPUs' own collectives (NCCL): at most one step's worth of skew, or ranks still loading.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
IDLE_TIMEOUT = datetime.timedelta(days=365)  # a follower waits this long for the next job
WATCHDOG_POLL_S = 0.5
_FRAME = 1024  # bytes of one status message: phase, code, length (2 bytes), text
_READY, _STEP, _DONE = 1, 2, 3  # where in a job an exchange happens
_OK, _CANCELLED, _FAILED, _INTERNAL, _PEER = 0, 1, 2, 3, 4  # a rank's status


class _PeerFailed(Exception):
    """Another rank failed before the transformer ran; this rank stops too (its status says so)."""


def start(plan: Plan, wan: WanModel) -> ParallelWan:
    """Rank 0: start the followers and join them; returns the video model that runs on every rank.

    Call it from the main thread (followers die when the thread that started them exits).
    """
    world = plan.settings.num_gpus
    device_type = plan.device.type
    if device_type == "cpu":  # the same code on N CPU processes (gloo); slower than one process, for the tests
        log.warning("NUM_GPUS=%d on a machine without CUDA: %d CPU processes share each video (tests only; slower "
                    "than one process)", world, world)
    if plan.placement.wan_profile != "full":
        log.warning("Wan runs with the %s profile on each GPU: context parallelism with offloading has not been "
                    "tested", plan.placement.wan_profile)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (ranks of one host)
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "PARALLEL_PARENT_PID": str(os.getpid())}
    followers = [subprocess.Popen([sys.executable, "-c", "import parallel; parallel.follower_main()"], cwd=ROOT,
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in range(1, world)]
    watchdog = _Watchdog(followers)
    watchdog.start()  # before joining: a follower that fails to start must not leave rank 0 waiting
    group = _join(0, world, port, device_type)
    dist.broadcast_object_list([plan], src=0, group=group.jobs)  # followers run exactly this plan
    runner = ParallelWan(wan, group, watchdog=watchdog)
    atexit.register(runner.stop)
    log.info("context parallelism: %d ranks on %s (Ulysses degree %d), follower pids %s", world, device_type, world,
             [p.pid for p in followers])
    return runner


def follower_main() -> None:
    """Ranks 1..N-1: build the models, then run what rank 0 sends until it says stop."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    faulthandler.enable()  # as in handler.main: a native crash leaves its Python stacks in the worker's log
    # Die with rank 0, whatever kills it; if it is already gone, never start.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ["PARALLEL_PARENT_PID"]):
        os._exit(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    group = _join(rank, world, int(os.environ["MASTER_PORT"]), device_type)
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group.jobs)
    plan: Plan = box[0]
    logs.quiet_third_party()
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    wan = ParallelWan(WanModel(plan.settings, device, plan.placement), group)
    while True:
        dist.broadcast_object_list(box, src=0, group=group.jobs)
        if box[0][0] == "stop":
            break
        wan.follow(box[0])
    try:
        dist.destroy_process_group()
    finally:
        # Exit without interpreter finalization: gloo's threads may still hold tensors then, and freeing them
        # without a live interpreter aborts the process (SIGABRT) after a clean stop. Nothing else to flush.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


class _Group:
    """This rank's place in the process group: rank, size, device type and two gloo groups for control."""

    def __init__(self, rank: int, world: int, device_type: str) -> None:
        self.rank, self.world, self.device_type = rank, world, device_type
        # Jobs: rank 0 -> all, waited for without limit. Statuses: all <-> all, each wait with its own limit.
        self.jobs = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.status = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _join(rank: int, world: int, port: int, device_type: str) -> _Group:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    # On GPUs, CPU tensors (diffusers' size exchanges, ours) go through gloo and GPU tensors through NCCL.
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return _Group(rank, world, device_type)


class ParallelWan:
    """The `VideoModel` interface (models.wan) on every rank at once: rank 0 holds it as its video model and
    each follower runs what rank 0 sends. Parking and placing concern rank 0's GPU alone."""

    name = "wan"
    compiled = False  # plan.decide refuses WAN_COMPILE with NUM_GPUS > 1

    def __init__(self, inner: WanModel, group: _Group, watchdog: _Watchdog | None = None) -> None:
        self._inner, self._group, self._watchdog = inner, group, watchdog
        self._parallel = False  # the transformer runs in context parallelism on every rank
        self._ready_pending = False  # this job's first transformer call has not exchanged statuses yet
        self._cancel: Cancelled | None = None  # rank 0: the job's cancelled()
        self._cancel_now = False  # what the last step-end exchange decided
        self._stopped = False

    def park(self) -> None:
        self._inner.park()

    def resident(self) -> None:
        self._inner.resident()

    def warm_up(self) -> float:
        return 0.0  # nothing compiled to warm up (see `compiled`)

    # ------------------------------------------------------------------ rank 0
    def load(self) -> float:
        """Load Wan on every rank and enable context parallelism; seconds (0.0 when done before)."""
        if self._parallel:
            return 0.0
        start = time.perf_counter()
        self._send(("load",))
        self._load_everywhere()
        return time.perf_counter() - start

    def generate(self, job: VideoJob, image: Image.Image, progress: Progress | None = None,
                 cancelled: Cancelled | None = None, on_frames: Frames | None = None,
                 ) -> tuple[np.ndarray, dict[str, float]]:
        self.load()  # loaded already when ModelHandler.model handed this model out
        fetch_s = self._fetch_loras(job)  # once here, so that the other ranks find the files on disk
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # lossless: every rank starts from the same pixels
        # The ranks need the checked job and its first frame, not the request's image data (up to 28 M characters).
        self._send(("generate", replace(job, image_url=""), buf.getvalue()))
        self._cancel = cancelled
        try:
            frames, timings = self._together(lambda: self._generate(job, image, progress, on_frames),
                                             transformer_runs=True)
        finally:
            self._cancel = None
        if fetch_s:
            timings["lora_s"] = timings.get("lora_s", 0.0) + fetch_s
        return frames, timings

    def stop(self) -> None:
        """Tell the followers to exit and wait for them (at interpreter exit)."""
        if self._stopped or self._group.rank != 0:
            return
        self._stopped = True
        self._watchdog.stopping = True
        try:
            self._send(("stop",))
        except Exception:  # noqa: BLE001 - followers already gone: nothing left to stop
            pass
        self._watchdog.reap()
        dist.destroy_process_group()

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, group=self._group.jobs)

    def _fetch_loras(self, job: VideoJob) -> float:
        loaded = self._inner.loras.loaded if self._inner.loras else {}
        specs = [spec for spec in job.loras if spec.kind != "local" and spec.adapter_name not in loaded]
        if not specs:
            return 0.0
        start = time.perf_counter()
        for spec in specs:
            self._inner.fetch_lora(spec)
        return time.perf_counter() - start

    # ------------------------------------------------------------- followers
    def follow(self, message: tuple) -> None:
        """Run one message from rank 0 (its failures are reported to rank 0, never raised here)."""
        kind = message[0]
        if kind == "load":
            self._load_everywhere()
        elif kind == "generate":
            _, job, png = message
            image = Image.open(io.BytesIO(png))
            image.load()
            self._together(lambda: self._generate(job, image, None), transformer_runs=True)
        else:
            raise ValueError(f"unknown message {kind!r}")

    # ------------------------------------------------------------ every rank
    def _load_everywhere(self) -> None:
        # Load first and enable parallelism only once every rank has loaded: enabling it is itself collective.
        self._together(self._load_here, timeout=LOAD_TIMEOUT_S)
        self._together(self._enable_parallelism, timeout=LOAD_TIMEOUT_S)
        self._parallel = True

    def _load_here(self) -> None:
        self._inner.load()
        self._inner.resident()

    def _enable_parallelism(self) -> None:
        import transformers  # noqa: F401 - diffusers' context-parallel hooks log with warning_once, which it adds
        from diffusers import ContextParallelConfig

        transformer = self._inner.pipe.transformer
        if transformer._parallel_config is not None:
            return  # a retry after another rank failed to enable it
        # ulysses_anything: any token count and head count (diffusers' own CLI uses it): with plain Ulysses,
        # a video whose token count does not divide by the number of GPUs (624x624 -> 31,941 tokens) fails.
        config = ContextParallelConfig(ulysses_degree=self._group.world, ulysses_anything=True)
        with _cpu_shims(self._group.device_type):
            transformer.enable_parallelism(config=config)
        # Wan's plan also splits a per-token (2-D) timestep, which Wan2.2 has; Wan2.1's is 1-D and rightly
        # stays whole, and that module's only warning says so on every rank.
        logging.getLogger("diffusers.hooks.context_parallel").setLevel(logging.ERROR)
        transformer.register_forward_pre_hook(self._before_transformer)

    def _generate(self, job: VideoJob, image: Image.Image, progress: Progress | None,
                  on_frames: Frames | None = None) -> tuple[np.ndarray, dict[str, float]]:
        # cancelled() reads the decision of the step-end exchange, the same on every rank, so WanModel
        # raises its own JobCancelled on every rank at the same step. Only rank 0 encodes the frames.
        return self._inner.generate(job, image, _best_effort(progress), lambda: self._cancel_now, on_frames,
                                    on_step=self._step_end)

    def _before_transformer(self, module: Any, args: Any) -> None:
        if self._ready_pending:  # the job's first transformer call: did every rank get this far?
            self._ready_pending = False
            statuses = _exchange(self._group, _READY, _OK, "")
            if any(code != _OK for code, _ in statuses):
                raise _PeerFailed()

    def _step_end(self) -> None:
        cancel = self._group.rank == 0 and self._cancel is not None and self._cancel()
        statuses = _exchange(self._group, _STEP, _CANCELLED if cancel else _OK, "")
        self._cancel_now = any(code == _CANCELLED for code, _ in statuses)

    def _together(self, work: Callable[[], Any], transformer_runs: bool = False,
                  timeout: float = STEP_TIMEOUT_S) -> Any:
        """Run `work` on this rank, exchange every rank's status, and on rank 0 return or raise for them all."""
        self._ready_pending, self._cancel_now = transformer_runs, False
        result, error, code, text = None, None, _OK, ""
        try:
            result = work()
        except JobCancelled as err:
            error, code = err, _CANCELLED
        except _PeerFailed as err:
            error, code = err, _PEER
        except (GenerationError, InputError) as err:
            error, code, text = err, _FAILED, str(err)
        except Exception as err:  # noqa: BLE001 - reported to rank 0, which answers the job with it
            log.exception("rank %d: the job failed", self._group.rank)
            error, code, text = err, _INTERNAL, f"{type(err).__name__}: {first_line(err)}"
        if self._ready_pending:  # failed before the transformer: the others wait for this rank's word there
            self._ready_pending = False
            _exchange(self._group, _READY, code, text, timeout)
        statuses = _exchange(self._group, _DONE, code, text, timeout)
        if self._group.rank != 0:
            return None
        if error is not None and not isinstance(error, _PeerFailed):
            raise error  # rank 0's own failure, as the single-process worker would raise it
        for rank, (peer_code, peer_text) in enumerate(statuses):
            if peer_code == _CANCELLED:
                raise JobCancelled(peer_text or "The job was cancelled.")
            if peer_code == _FAILED:
                raise GenerationError(peer_text)
            if peer_code == _INTERNAL:
                raise GenerationError(f"The job failed on GPU {rank} with an internal error ({peer_text}); the "
                                      f"worker is ready for the next job.")
        if error is not None:  # stopped for a peer that reported nothing: cannot happen, but never return None
            raise GenerationError("The job failed on another GPU; the worker is ready for the next job.")
        return result



def _exchange(group: _Group, phase: int, code: int, text: str,
              timeout: float = STEP_TIMEOUT_S) -> list[tuple[int, str]]:
    """All-gather one status per rank; a rank that never arrives, or arrives elsewhere, ends the worker."""
    data = text.encode()[:_FRAME - 4]
    frame = torch.zeros(_FRAME, dtype=torch.uint8)
    frame[:4] = torch.tensor([phase, code, len(data) >> 8, len(data) & 255], dtype=torch.uint8)
    if data:
        frame[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    frames = [torch.empty_like(frame) for _ in range(group.world)]
    work = dist.all_gather(frames, frame, group=group.status, async_op=True)
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as err:  # timed out, or a rank's process is gone
        _out_of_step(group.rank, f"the other ranks did not reach the same point of the job within "
                                       f"{timeout:.0f} s ({str(err).strip()[:100]})")
    statuses = []
    for f in frames:
        values = f.tolist()
        if values[0] != phase:
            _out_of_step(group.rank, "the ranks reached different points of the job")
        size = values[2] << 8 | values[3]
        statuses.append((values[1], bytes(values[4:4 + size]).decode(errors="replace")))
    return statuses


def _best_effort(progress: Progress | None) -> Progress | None:
    """Progress reports that cannot fail the job: a rank that raised mid-step would leave the others waiting."""
    if progress is None:
        return None

    def report(phase: str, step: int, total: int) -> None:
        try:
            progress(phase, step, total)
        except Exception as err:  # noqa: BLE001 - a lost progress update is not worth the job
            log.warning("progress update failed: %s", err)

    return report


def _out_of_step(rank: int, reason: str) -> None:
    log.error("rank %d: %s; exiting so that RunPod restarts the worker", rank, reason)
    logging.shutdown()
    os._exit(1)


class _Watchdog(threading.Thread):
    """Rank 0: a follower process that exits ends the worker (exit code 1) instead of leaving jobs to hang."""

    def __init__(self, followers: list[subprocess.Popen]) -> None:
        super().__init__(name="parallel-watchdog", daemon=True)
        self.followers, self.stopping = followers, False

    def run(self) -> None:
        while not self.stopping:
            for rank, proc in enumerate(self.followers, start=1):
                if proc.poll() is not None and not self.stopping:
                    for other in self.followers:
                        if other.poll() is None:
                            other.kill()
                    _out_of_step(0, f"the GPU process of rank {rank} (pid {proc.pid}) exited with code "
                                    f"{proc.returncode}")
            time.sleep(WATCHDOG_POLL_S)

    def reap(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.followers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def _cpu_shims(device_type: str):
    """Two narrow patches that let diffusers 0.42.1's context parallelism run on CPU processes (the tests).

    - enable_parallelism maps rank -> device as rank % torch.accelerator.device_count(), which is 0
      without an accelerator (ZeroDivisionError): it counts one device while parallelism is enabled.
    - ulysses_anything gathers the last output with dist.all_gather over tensors of unequal lengths,
      which NCCL supports and gloo does not: on gloo the pieces are padded to one length and cut after.
      This one stays in place after the context: it runs at every forward.
    On GPUs neither applies and diffusers runs unchanged.
    """
    if device_type != "cpu":
        yield
        return
    import diffusers.hooks.context_parallel as context_parallel

    context_parallel._all_gather_anything = _all_gather_padded
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _all_gather_padded(tensor: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    from diffusers.models._modeling_parallel import gather_size_by_comm

    tensor = tensor.contiguous()
    sizes = gather_size_by_comm(tensor.shape[dim], group)
    pad = max(sizes) - tensor.shape[dim]
    if pad:
        shape = list(tensor.shape)
        shape[dim] = pad
        tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    parts = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes, strict=True)], dim=dim)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
