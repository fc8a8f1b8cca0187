"""Every error the worker turns into a sentence, and the two text helpers those sentences use.

The kinds decide who is told what: an `InputError` refuses a request before any model work, a
`SettingsError` stops the worker at start-up, a `GenerationError` (and its kinds) fails one job
with a sentence the user can act on, a `DeliveryError` fails a job whose result could not be
returned. Anything else is an internal error: the job gets `internal_error(err)` and the worker
goes on serving. This module imports nothing of the project, so every module may import it.
"""

from __future__ import annotations

from typing import Any


class InputError(ValueError):
    """A request the worker refuses; str(err) is the one sentence the user sees."""


class SettingsError(ValueError):
    """The environment describes a configuration the worker cannot run with."""


class ParallelError(SettingsError):
    """NUM_GPUS asks for something this machine or configuration cannot do; str(err) is one sentence."""


class GenerationError(RuntimeError):
    """A job that failed in a way the user can act on; str(err) is the sentence they see."""


class ModelUnavailable(GenerationError):
    """The weights are not on this worker and cannot be fetched (weights.py); the message names the model, the
    places looked at and the fix."""


class JobCancelled(GenerationError):
    """RunPod cancelled the job (or it timed out); raised from the step callback, so within one step."""


class ResourceError(RuntimeError):
    """A folder the worker writes (TMPDIR, LORA_CACHE_DIR, ...) cannot take a file: not the request's fault, and the
    next job may well succeed. str(err) is one sentence naming the setting, the folder and the fix
    (folders.folder_fault)."""


class DeliveryError(RuntimeError):
    """The result could be neither uploaded nor returned inline; the message names the cause."""


def shorten(value: Any, limit: int = 60) -> str:
    """A value as the user sent it, cut short so an error never echoes a whole payload."""
    text = repr(value)
    if len(text) <= limit:
        return text
    count = len(value) if isinstance(value, str) else len(text)  # a string's own length, not its repr's
    return f"{text[:limit]}... ({count:,} characters)"


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters (library messages run on)."""
    text = str(err)
    return text.splitlines()[0][:limit] if text else ""


def internal_error(err: BaseException, where: str = "") -> str:
    """The sentence a job gets for a failure nobody foresaw; the worker keeps serving after it."""
    return (f"The job failed{where} with an internal error ({type(err).__name__}: {first_line(err)}); "
            f"the worker is ready for the next job.")
