"""The folders the worker writes (TMPDIR, LORA_CACHE_DIR, COMPILE_CACHE_DIR, LOCAL_OUTPUT_DIR): what stops
one taking a file, as the end of a sentence naming the setting and the fix (`folder_fault`), and the
start-up check that reports each folder that cannot work once (`check_folders`).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from settings import Settings

MIN_FREE_BYTES = 100 * 1000**2  # below this, start-up warns that the disk is nearly full
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)  # EEXIST: mkdir found a file where the folder should be


def folder_fault(err: OSError, setting: str, folder: str | Path) -> str | None:
    """What stops `folder` (the value of the env var `setting`) taking a file, and the fix, from the OSError a write
    raised: words to end a sentence with. None when the error is not about the folder."""
    where = f"{setting}={str(folder)!r}"
    if err.errno in DISK_FULL:
        return (f"the disk holding {where} is full ({free_mb(folder)} free); free space there or set {setting} to a "
                f"folder on a larger disk")
    if err.errno in _NOT_WRITABLE:
        return f"{where} is not writable ({err.strerror}); set {setting} to a folder this worker can write"
    if err.errno in _NOT_A_FOLDER:
        return f"{where} is not a folder ({first_file(folder)} is a file); set {setting} to a folder"
    if err.errno == errno.ENOENT:
        return f"{where} does not exist; create it or set {setting} to an existing folder"
    return None


def existing_part(folder: str | Path) -> Path:
    """The folder itself, or its nearest ancestor that exists."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def first_file(folder: str | Path) -> str:
    """The file that stands where `folder` or one of its ancestors should be a folder."""
    path = existing_part(folder)
    return str(path) if not path.is_dir() else str(folder)


def free_mb(folder: str | Path) -> str:
    try:
        return f"{shutil.disk_usage(existing_part(folder)).free / 1e6:,.1f} MB"
    except OSError:
        return "unknown space"


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
