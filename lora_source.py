"""Where a LoRA comes from: a request's `path` (or WAN_FAST_LORA) read as an http(s) URL, a Hugging Face
repo id with its file, or a local .safetensors file inside the folders LoRAs may be read from.

`parse_source` checks the form only (no I/O besides resolving a local path), so the job check and
start-up can both call it; loras.py fetches and loads what a `LoraSpec` names.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

from errors import InputError, shorten

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' name for a LoRA in a hub repo
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[^\s]+))?$")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a job: where its file is, how strongly it applies, and how errors name it."""

    kind: str  # "url" | "hub" | "local"
    location: str  # the URL, the hub repo id, or the resolved local path
    filename: str | None  # the file inside a hub repo
    scale: float
    label: str  # "Field 'loras[0].path'" or "WAN_FAST_LORA": how messages name where it came from
    shown: str  # the path as given, cut short

    @property
    def key(self) -> str:
        """sha256 of the source: the disk cache's file name and the adapter's identity."""
        return hashlib.sha256(f"{self.kind}\n{self.location}\n{self.filename}".encode()).hexdigest()

    @property
    def adapter_name(self) -> str:
        return f"lora_{self.key[:16]}"

    def names(self) -> str:
        """The start of every error sentence about this LoRA."""
        return f"{self.label} names the LoRA {self.shown}, which"


def parse_source(path: str, label: str, roots: Iterable[str], weight_name: str | None = None,
                 scale: float = 1.0) -> LoraSpec:
    """Check a LoRA path's form (and, for a local file, that it lies inside `roots`); no I/O besides realpath."""
    text = path.strip()
    shown = shorten(text or path, 100)  # a blank path is shown as sent, not as ''
    if re.match(r"^https?://", text, flags=re.I):
        if weight_name:
            raise InputError(f"{label} is a URL, {shown}, so weight_name (which picks a file in a hub repo) must "
                             f"be left out.")
        if not urlparse(text).hostname:
            raise InputError(f"{label} must be an http(s) URL with a host name, got {shown}.")
        return LoraSpec("url", text, None, scale, label, shown)
    if text.startswith("/"):
        if weight_name:
            raise InputError(f"{label} is a local path, {shown}, so weight_name (which picks a file in a hub repo) "
                             f"must be left out.")
        if not text.lower().endswith(".safetensors"):
            raise InputError(f"{label} must name a .safetensors file, got {shown}; pickled .ckpt/.pt/.bin files "
                             f"are not loaded.")
        real = os.path.realpath(text)
        allowed = [os.path.realpath(r) for r in roots]
        if not any(os.path.commonpath([real, r]) == r for r in allowed):
            raise InputError(f"{label} is the local path {shown}, which lies outside the folders LoRAs may be "
                             f"read from ({', '.join(allowed)}); put the file there or send a URL.")
        return LoraSpec("local", real, None, scale, label, shown)
    match = _HUB_ID.match(text)
    if not match:
        raise InputError(f"{label} must be an http(s) URL, a Hugging Face repo id ('owner/name', optionally "
                         f"followed by '/file.safetensors') or an absolute path of a .safetensors file, got {shown}.")
    if not match["file"] and match["repo"].lower().endswith(".safetensors"):
        raise InputError(f"{label} looks like a relative file path, {shown}; a local LoRA needs an absolute path "
                         f"and a hub repo id is 'owner/name'.")
    if match["file"] and weight_name:
        raise InputError(f"{label} names the file {shorten(match['file'], 60)} inside the repo and weight_name "
                         f"names another; give the file in one of them.")
    filename = match["file"] or weight_name or DEFAULT_WEIGHT_NAME
    if ".." in filename.split("/") or filename.startswith("/") or not filename.lower().endswith(".safetensors"):
        raise InputError(f"{label} must name a .safetensors file inside the repo {match['repo']!r}, got "
                         f"{shorten(filename, 60)}.")
    return LoraSpec("hub", match["repo"], filename, scale, label, shown)
