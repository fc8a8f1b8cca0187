"""Where each model's weights are, and fetching the missing ones once.

`local_folder(name, location, download)` returns the folder a model loads from, looking in order at:
the location settings give (SDXL_MODEL_ID / SDXL_REFINER_ID / SDXL_VAE_ID / WAN_MODEL_ID: a folder,
or a hub id), MODEL_DIR/<name> (weights baked into the image), the Hugging Face caches (RunPod's
cached models under /runpod-volume/huggingface-cache/hub, HF_HOME's, the container disk's) and a
cached-model folder whose name RunPod wrote in other letter case. A model found nowhere is fetched
once with `snapshot_download` (unless WEIGHTS_DOWNLOAD=0) into the HF cache: on the network volume
when one is mounted, else on the container disk; the log gets a progress line every few seconds.
Weights that cannot be had raise `ModelUnavailable` with one sentence naming the model, the places
looked at and the fix. download_weights.py fetches from the same table (REAL_MODELS).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import ModelUnavailable, first_line

log = logging.getLogger("worker")

# What each real model needs from the hub: SDXL in its fp16 variant only (half the bytes). "env" is the
# variable that names another repository or a folder; "group" is download_weights' --only / BAKE_WEIGHTS.
REAL_MODELS: dict[str, dict] = {
    "sdxl-base": {
        "repo_id": "stabilityai/stable-diffusion-xl-base-1.0", "env": "SDXL_MODEL_ID", "group": "sdxl",
        "allow_patterns": ["*.json", "*.txt", "**/*.fp16.safetensors"],
    },
    "sdxl-refiner": {
        "repo_id": "stabilityai/stable-diffusion-xl-refiner-1.0", "env": "SDXL_REFINER_ID", "group": "sdxl",
        "allow_patterns": ["*.json", "*.txt", "**/*.fp16.safetensors"],
    },
    "sdxl-vae": {
        "repo_id": "madebyollin/sdxl-vae-fp16-fix", "env": "SDXL_VAE_ID", "group": "sdxl",
        "allow_patterns": ["config.json", "diffusion_pytorch_model.safetensors"],
    },
    "wan-i2v": {
        "repo_id": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "env": "WAN_MODEL_ID", "group": "wan",
        "allow_patterns": ["*.json", "*.txt", "*.model", "**/*.safetensors", "**/*.json"],
    },
}
GROUPS = {"sdxl": ["sdxl-base", "sdxl-refiner", "sdxl-vae"], "wan": ["wan-i2v"]}
VOLUME = Path("/runpod-volume")  # RunPod mounts the network volume and its cached models here
WAN_PARTS = ("transformer", "image_encoder", "vae", "text_encoder")  # the subfolders a Wan load reads, in order
FLOAT8_TRANSFORMER = "transformer-fp8"  # beside "transformer": the float8 transformer download_weights.py --fp8 stores
PROGRESS_EVERY_S = 10.0  # a progress line at least this often ...
PROGRESS_EVERY_SHARE = 0.05  # ... or whenever another 5% has arrived


class NotEnoughDisk(Exception):
    """The disk the weights would be fetched to has less room than they need."""


def with_retries(fn: Callable[[], str], what: str, tries: int = 5, first_wait_s: float = 5.0,
                 permanent: tuple[type[BaseException], ...] = ()) -> str:
    """Run fn, retrying with exponential backoff: hub downloads of 70 GB do hit transient errors.

    Errors of a `permanent` type (a repository that does not exist) are raised at once.
    """
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except permanent:
            raise
        except Exception as err:  # noqa: BLE001 - any network/hub failure is worth another try
            if attempt == tries:
                raise
            wait = first_wait_s * 2 ** (attempt - 1)
            print(f"{what}: attempt {attempt}/{tries} failed ({err}); retrying in {wait:.0f}s", flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def local_folder(name: str, location: str, download: bool, model_dir: str = "/models", volume: Path = VOLUME) -> str:
    """The folder to load model `name` (a REAL_MODELS key) from; fetches it first when it is nowhere here.

    `location` is what settings hold for it: a folder, or a hub id; `model_dir` is MODEL_DIR (baked weights).
    Raises ModelUnavailable.
    """
    spec = REAL_MODELS[name]
    if _is_path(location):
        return _model_folder(Path(location).expanduser(), spec)
    baked = Path(model_dir) / name
    # Settings look in MODEL_DIR only when the variable is unset; the default id, named, finds baked weights too.
    if location == spec["repo_id"] and _holds_model(baked):
        return str(baked)
    caches = _hf_caches(volume)
    found = _cached(location, spec["allow_patterns"], caches) or _runpod_cached(location, _runpod_cache(volume))
    if found:
        return found
    default = location == spec["repo_id"]
    looked = ", ".join(str(p) for p in ([baked] if default else []) + caches)
    fixes = [f"set the endpoint's Model to {location}", "mount a network volume holding it",
             *([] if download else ["set WEIGHTS_DOWNLOAD=1"]),
             *([f"bake it into the image with BAKE_WEIGHTS={spec['group']}"] if default else [])]  # bakes defaults only
    fixes = ", ".join(fixes[:-1]) + ", or " + fixes[-1]
    if not download:
        raise ModelUnavailable(f"The weights of {location} ({spec['env']}) are not on this worker (looked in "
                           f"{looked}) and WEIGHTS_DOWNLOAD=0 forbids fetching them; {fixes}.")
    try:
        return fetch(location, spec["allow_patterns"], download_cache(volume))
    except Exception as err:  # noqa: BLE001 - whatever failed, the job gets one sentence and the worker serves on
        reason = f"{type(err).__name__}: {first_line(err)}"
        raise ModelUnavailable(f"The weights of {location} ({spec['env']}) are not on this worker (looked in "
                           f"{looked}) and fetching them failed ({reason}); {fixes}.") from err


def wan_parts(folder: str, fp8: bool) -> tuple[str, ...]:
    """The subfolders a Wan load reads, in its order: the float8 transformer download_weights.py --fp8 stored,
    when WAN_FP8 is on and there is one, instead of the bf16 transformer (half the bytes, no quantizing)."""
    stored_fp8 = fp8 and (Path(folder) / FLOAT8_TRANSFORMER).is_dir()
    return (FLOAT8_TRANSFORMER if stored_fp8 else "transformer", *WAN_PARTS[1:])


def _is_path(location: str) -> bool:
    """A folder, not a hub id: it exists, or it is written as a path."""
    return location.startswith(("/", "./", "../", "~")) or Path(location).exists()


def _holds_model(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def _model_folder(folder: Path, spec: dict) -> str:
    if _holds_model(folder):
        return str(folder)
    raise ModelUnavailable(
        f"{spec['env']}={str(folder)!r} is not a model folder (no model_index.json or config.json in it); point "
        f"{spec['env']} at a folder written by 'python download_weights.py --dir DIR', or at a hub id such as "
        f"{spec['repo_id']}.")


def _runpod_cache(volume: Path) -> Path:
    return volume / "huggingface-cache" / "hub"


def _hf_caches(volume: Path) -> list[Path]:
    """Hugging Face cache folders worth looking in: RunPod's cached models, HF_HOME's, the container disk's."""
    from huggingface_hub import constants

    return list(dict.fromkeys([_runpod_cache(volume), Path(constants.HF_HUB_CACHE), _container_cache()]))


def _container_cache() -> Path:
    # huggingface_hub's own default, used when HF_HOME points at a volume that is not mounted.
    return Path.home() / ".cache" / "huggingface" / "hub"


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")  # the HF cache's folder name for a model repository


def _cached(repo_id: str, patterns: list[str], caches: list[Path]) -> str | None:
    """The repository's snapshot in one of the HF caches, when it is complete there (huggingface_hub checks)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for cache in caches:
        if not (cache / _repo_folder(repo_id)).is_dir():
            continue
        try:
            return snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache, local_files_only=True)
        except LocalEntryNotFoundError:  # not there, or a download there did not finish
            continue
    return None


def _runpod_cached(repo_id: str, root: Path) -> str | None:
    """A cached-model folder RunPod wrote with other letter case (models--wan-ai--wan2.1-...), which
    huggingface_hub's case-sensitive lookup misses; its newest snapshot holding a model."""
    wanted = _repo_folder(repo_id)
    if not root.is_dir():
        return None
    for entry in sorted(root.iterdir()):
        # A folder named exactly as huggingface_hub names it and holding refs/ is its own (perhaps an
        # unfinished download of ours): _cached has judged it already.
        if entry.name.lower() != wanted.lower() or (entry.name == wanted and (entry / "refs").is_dir()):
            continue
        snapshots = [s for s in (entry / "snapshots").glob("*") if _holds_model(s)]
        if snapshots:
            return str(max(snapshots, key=lambda s: s.stat().st_mtime))
    return None


def download_cache(volume: Path = VOLUME) -> Path:
    """Where a missing model is fetched to: the HF cache (on the network volume in the image, where it
    outlives the worker) unless that lies on a volume that is not mounted; then the container disk."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE)
    if hub.is_relative_to(volume) and not volume.is_dir():
        return _container_cache()  # writing there would make a /runpod-volume folder look like a volume
    return hub


def fetch(repo_id: str, patterns: list[str], cache: Path) -> str:
    """snapshot_download the repository's `patterns` into `cache`, logging progress; returns the snapshot.
    Transient failures are retried; a repository that does not exist or is gated, or a disk too small, is not."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    return with_retries(lambda: _fetch_once(repo_id, patterns, cache), f"fetching {repo_id}", tries=3,
                        permanent=(RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, NotEnoughDisk))


def _fetch_once(repo_id: str, patterns: list[str], cache: Path) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    # The total for the progress lines: the sizes of the files the patterns select.
    siblings = HfApi().model_info(repo_id, files_metadata=True).siblings or []
    wanted = set(filter_repo_objects([s.rfilename for s in siblings], allow_patterns=patterns))
    total = sum(s.size or 0 for s in siblings if s.rfilename in wanted)
    blobs = cache / _repo_folder(repo_id) / "blobs"
    # Refused before the first byte rather than when the disk fills up, tens of GB later.
    needed, free = total - _bytes_in(blobs), _free_bytes(cache)
    if needed > free:
        raise NotEnoughDisk(f"{_size(needed)} needed, {_size(free)} free in {cache}")
    log.info("fetching %s (%d files, %s) into %s", repo_id, len(wanted), _size(total), cache)
    start = time.monotonic()
    with _progress_lines(repo_id, blobs, total):
        folder = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache, tqdm_class=_no_bars())
    log.info("fetched %s: %s in %.1f s, into %s", repo_id, _size(total), time.monotonic() - start, folder)
    return folder


@contextmanager
def _progress_lines(repo_id: str, blobs: Path, total: int) -> Iterator[None]:
    """Log 'fetching REPO: 3.2/6.9 GB (46%), 110 MB/s' from the bytes in the cache's blobs folder: a
    line in the worker's log rather than a progress bar, whatever huggingface_hub's version draws."""
    stop = threading.Event()
    before = _bytes_in(blobs)  # a resumed download's earlier bytes count as fetched already

    def watch() -> None:
        start = last_time = time.monotonic()
        last_done = 0
        while not stop.wait(1.0):
            done, now = min(_bytes_in(blobs) - before, total), time.monotonic()
            if now - last_time < PROGRESS_EVERY_S and (done - last_done) < PROGRESS_EVERY_SHARE * total:
                continue
            log.info("fetching %s: %s (%d%%), %s/s", repo_id, _fraction(done, total), 100 * done // max(total, 1),
                     _size(done / (now - start)))
            last_time, last_done = now, done

    thread = threading.Thread(target=watch, name="weights-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _bytes_in(folder: Path) -> int:
    """Bytes under `folder`, files being written (*.incomplete) included; files may vanish while counting."""
    total = 0
    for path in folder.glob("*") if folder.is_dir() else ():
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def _free_bytes(folder: Path) -> int:
    while not folder.exists():  # the cache may not exist yet: its disk is that of the nearest existing parent
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _fraction(done: int, total: int) -> str:
    """'3.2/6.9 GB': both in the total's unit."""
    unit, scale = ("GB", 1e9) if total >= 1e9 else ("MB", 1e6)
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


def _no_bars() -> type:
    """huggingface_hub's tqdm class with every bar off: the worker logs its own progress lines."""
    from huggingface_hub.utils import tqdm

    class NoBars(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return NoBars
