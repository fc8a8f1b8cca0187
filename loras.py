"""LoRA adapters for both modes: where a LoRA file comes from, the disk cache, and applying it per job.

A job's LoRAs (`lora_source.LoraSpec`, resolved when the job is checked) name a file by http(s)
URL, Hugging Face repo id or local path. URLs are downloaded once through fetch.py (SSRF-safe,
deadline, byte cap while streaming), checked to be a complete .safetensors file, and kept in a disk cache keyed by
the sha256 of the URL, least recently used files evicted beyond LORA_CACHE_GB. Hub files
come through `hf_hub_download` (the Hugging Face cache); local paths must resolve inside
the model folders, the HF cache or /runpod-volume.

`PipelineLoras` keeps the adapters loaded in one pipeline (PEFT, one adapter per source)
and makes exactly the job's set active: a job without LoRAs runs with every adapter
disabled, which is bit-identical to a pipeline that never saw one (PEFT's disabled layers
call the original module). With LORA_FUSE=1 the active LoRAs are merged into the denoiser's
weights for speed; the original weights are kept in CPU memory and copied back before the
next job that needs another set, because un-merging by subtraction is not exact in bf16.
A file that does not fit the model is an `InputError` naming the LoRA, never a silent no-op:
diffusers only warns about LoRA keys that match no layer, so the layers actually loaded are
counted against the LoRA's own.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from errors import InputError, ResourceError, first_line, shorten
from fetch import Refusals, stream_url
from folders import folder_fault
from lora_source import LoraSpec

log = logging.getLogger("worker")
KEEP_LOADED = 4  # adapters kept loaded per pipeline beyond the job's own (least recently used dropped)
_CHUNK = 1024 * 1024
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+?)\.lora_[AB]\.[^:]*: copying a param with shape "
                            r"torch\.Size\((\[[^\]]*\])\) from checkpoint, the shape in current model is "
                            r"torch\.Size\((\[[^\]]*\])\)")


# --------------------------------------------------------------------------------- files
class LoraCache:
    """Downloaded LoRA files on disk, named by the sha256 of their URL; least recently used evicted.

    Use refreshes a file's mtime (atime is unreliable on noatime mounts). Downloads land in a
    temporary file in the same folder and are renamed into place only once complete and
    checked, so a crashed download or a concurrent worker never sees a partial file.
    """

    def __init__(self, directory: str | Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def path_for(self, spec: LoraSpec) -> Path:
        return self.directory / f"{spec.key}.safetensors"

    def fetch(self, spec: LoraSpec, *, max_bytes: int, timeout_s: float) -> Path:
        """The local file of a LoRA, downloading it first when it is not cached."""
        if spec.kind == "local":
            if not os.path.isfile(spec.location):
                raise InputError(f"{spec.names()} does not exist (or is not a file).")
            return Path(spec.location)
        if spec.kind == "hub":
            return _hub_file(spec, max_bytes)
        path = self.path_for(spec)
        if path.is_file():
            with suppress(OSError):  # a read-only cache still serves its files; only eviction order suffers
                os.utime(path)  # most recently used
            return path
        try:
            self._download(spec, path, max_bytes=max_bytes, timeout_s=timeout_s)
        except OSError as err:
            if fault := folder_fault(err, "LORA_CACHE_DIR", self.directory):
                raise ResourceError(f"{spec.names()} cannot be downloaded into the LoRA cache: {fault}.") from None
            raise
        self.evict(keep=path)
        return path

    def _download(self, spec: LoraSpec, path: Path, *, max_bytes: int, timeout_s: float) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{spec.key}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            start = time.perf_counter()
            download(spec, partial, max_bytes=max_bytes, timeout_s=timeout_s)
            check_safetensors(partial, spec)  # never cache a file that cannot be loaded
            os.replace(partial, path)
            log.info("LoRA %s downloaded (%.1f MB) in %.1f s", spec.shown, path.stat().st_size / 1e6,
                     time.perf_counter() - start)
        finally:
            with suppress(OSError):  # nothing to remove when the folder could not be made
                partial.unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used files until the cache holds at most max_bytes (keeping `keep`)."""
        entries = []
        for entry in self.directory.glob("*"):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # another worker on the same volume removed it
                continue
            if entry.name.endswith(".part"):
                if time.time() - stat.st_mtime > 24 * 3600:  # left behind by a crashed download
                    entry.unlink(missing_ok=True)
                continue
            entries.append((stat.st_mtime, stat.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries):
            if total <= self.max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size
                log.info("LoRA cache: evicted %s (%.1f MB)", entry.name, size / 1e6)


def download(spec: LoraSpec, dest: Path, *, max_bytes: int, timeout_s: float) -> None:
    """Stream a URL to `dest` through fetch.stream_url, the downloader of image_url.

    The same protections as image_url: runpod's SSRF-safe safe_get (public addresses only,
    checked again on every redirect), a byte cap on the announced length and while streaming,
    and a hard deadline that holds even against a server that trickles its headers.
    """
    words = Refusals(
        start=spec.names(), thing="file", cap=f"at most {max_bytes:,} are accepted (LORA_MAX_GB)",
        slow=(f"{spec.names()} did not finish downloading within {timeout_s:g} s; use a "
              f"faster host or a file on the network volume."),
        no_host=f"{spec.label} must be an http(s) URL with a host name, got {spec.shown}.",
        allowed="only public http(s) addresses are allowed (a file on the network volume can be given as a local "
                "path)")
    with open(dest, "wb") as out:  # opened here, so the download thread never creates a file after the deadline
        stream_url(spec.location, out.write, max_bytes=max_bytes, timeout_s=timeout_s, words=words,
                   chunk_size=_CHUNK)


def _hub_file(spec: LoraSpec, max_bytes: int) -> Path:
    """A LoRA from the Hugging Face hub, through hf_hub_download and its cache (HF_HOME)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    try:
        return Path(hf_hub_download(spec.location, spec.filename, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached yet (or an offline cache miss): download below
        pass
    try:
        size = get_hf_file_metadata(hf_hub_url(spec.location, spec.filename)).size
        if size is not None and size > max_bytes:
            raise InputError(f"{spec.names()} is a file of {size:,} bytes; at most {max_bytes:,} are accepted "
                             f"(LORA_MAX_GB).")
        return Path(hf_hub_download(spec.location, spec.filename))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - hub errors: missing repo/file, gated, offline, network
        detail = first_line(err, 160)
        raise InputError(f"{spec.names()} cannot be fetched from the Hugging Face hub as {spec.location!r} file "
                         f"{spec.filename!r} ({type(err).__name__}: {detail}); check the repo id and weight_name."
                         ) from None


def check_safetensors(path: Path, spec: LoraSpec) -> None:
    """Refuse a file that is not a complete .safetensors file, before anything loads it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            count = len(list(handle.keys()))
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        detail = str(err).removeprefix("Error while deserializing header: ")
        size = path.stat().st_size if path.exists() else 0
        what = ("a truncated .safetensors file" if "not fully covered" in detail or "invalid header length" in detail
                else "not a .safetensors file")
        raise InputError(f"{spec.names()} is {what} ({size:,} bytes; safetensors: {detail}); LoRAs must be "
                         f"complete .safetensors files.") from None
    if count == 0:
        raise InputError(f"{spec.names()} is a .safetensors file without tensors; it holds no LoRA weights.")


def read_lora(path: Path, spec: LoraSpec) -> dict[str, Any]:
    from safetensors.torch import load_file

    check_safetensors(path, spec)
    return load_file(str(path))


# ------------------------------------------------------------------------------ adapters
# Keys under these belong to a pipeline component or a format diffusers converts; others are bare PEFT keys.
_COMPONENT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "transformer_2.",
                       "diffusion_model.", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")


def lora_layer_count(state: dict[str, Any]) -> int:
    """How many layers a LoRA state dict adapts (its down / A matrices), whatever its key format."""
    return sum(1 for key in state if key.endswith(_DOWN_SUFFIXES))


def _tuner_layers(modules: Iterable[Any]) -> Iterator[Any]:
    for model in modules:
        for _, layer in _tuner_layers_named(model):
            yield layer


def _tuner_layers_named(model: Any) -> Iterator[tuple[str, Any]]:
    """PEFT's LoRA layers in a model, each with the name of the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Loading a LoRA logs warnings we turn into errors ourselves (or that are noise: transformers'
    LOAD REPORT of the wrapped base layers, PEFT's notes on several adapters); keep them out of the log."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextmanager
def lora_disabled(module: Any) -> Iterator[None]:
    """Run with the LoRA layers inside `module` disabled (SDXL: the text encoder the refiner shares)."""
    layers = list(_tuner_layers([module])) if module is not None else []
    states = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled in zip(layers, states, strict=True):
            layer.enable_adapters(not was_disabled)


class PipelineLoras:
    """The LoRA adapters loaded into one diffusers pipeline, which of them are active, and fusing.

    `denoiser` is the component that runs every step ("unet" or "transformer"): the only one
    fused, since the text encoders run once per job. For a denoiser with float8 layers (WAN_FP8),
    `requantize(name, delta)` gives the weight `name` plus `delta`, quantized as the model's weights are
    (the layer's tensors by name): fusing copies them into the layer's own. With `unload_fused` (a pipeline
    whose only LoRA component is the denoiser), fusing also unloads the adapters, which leaves the
    denoiser's modules as they were when compiled: a compiled model runs the fused LoRA compiled, and the
    next job with another set loads its LoRAs again (from the local LoRA cache).
    """

    def __init__(self, pipe: Any, denoiser: str, model_words: str, *,
                 requantize: Callable[[str, Any], Any] | None = None, unload_fused: bool = False) -> None:
        self.pipe, self.denoiser, self.model_words = pipe, denoiser, model_words
        self.requantize, self.unload_fused = requantize, unload_fused
        self.loaded: OrderedDict[str, None] = OrderedDict()  # adapter names, least recently used first
        self.active: tuple[tuple[str, float], ...] | None = ()  # None: unknown after a failure
        self.fused = False
        # fused linear layer -> copies on the CPU of the tensors holding its weights
        self._originals: dict[Any, dict[str, Any]] = {}
        self.loads = 0  # adapters loaded so far (tests check that an unchanged set does not reload)

    def components(self) -> list[Any]:
        names = getattr(self.pipe, "_lora_loadable_modules", [self.denoiser])
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    def apply(self, specs: list[LoraSpec], fetch: Callable[[LoraSpec], Path], fuse: bool) -> bool:
        """Make exactly `specs` active (none: all disabled); returns whether anything changed."""
        wanted = tuple((spec.adapter_name, spec.scale) for spec in specs)
        fuse = fuse and bool(wanted)
        if wanted == self.active and fuse == self.fused:
            for name, _ in wanted:
                if name in self.loaded:  # not when fused and unloaded
                    self.loaded.move_to_end(name)
            return False
        try:
            if self.fused:
                self._restore()
            if not wanted:
                if self.active != () and self.loaded:
                    self.pipe.disable_lora()
                self.active = ()
                return True
            for spec in specs:
                if spec.adapter_name not in self.loaded:
                    self._load(spec, fetch(spec))
                self.loaded.move_to_end(spec.adapter_name)
            self._evict(keep={name for name, _ in wanted})
            self.pipe.enable_lora()
            self.pipe.set_adapters([name for name, _ in wanted], adapter_weights=[scale for _, scale in wanted])
            self.active = wanted
            if fuse:
                self._fuse([name for name, _ in wanted])
            return True
        except BaseException:
            self.active = None  # whatever happened, the next job sets the adapters again
            raise

    def _load(self, spec: LoraSpec, path: Path) -> None:
        state = self._with_prefix(read_lora(path, spec))
        expected = lora_layer_count(state)
        if expected == 0:
            raise InputError(f"{spec.names()} holds no LoRA weights (no lora_A/lora_down tensors among its "
                             f"{len(state)} keys, e.g. {shorten(next(iter(state)), 80)}); LoRAs in diffusers/PEFT, "
                             f"kohya, musubi or lightx2v/Kijai format are accepted.")
        name = spec.adapter_name
        start = time.perf_counter()
        try:
            with _quiet_loading():
                self.pipe.load_lora_weights(state, adapter_name=name)
        except Exception as err:  # noqa: BLE001 - diffusers/PEFT raise many types for a file that does not fit
            self._forget(name)
            raise InputError(f"{spec.names()} does not fit {self.model_words}: {_misfit(err, state)}; use a LoRA made "
                             f"for this model.") from None
        loaded = sum(1 for layer in _tuner_layers(self.components()) if name in getattr(layer, "lora_A", {}))
        if loaded < expected:
            self._forget(name)
            what = "none" if loaded == 0 else f"only {loaded}"
            raise InputError(f"{spec.names()} does not fit {self.model_words}: {what} of its {expected} LoRA layers "
                             f"match a layer of the model; use a LoRA made for this model.")
        self.loaded[name] = None
        self.loads += 1
        log.info("LoRA %s loaded as %s (%d layers) in %.2f s", spec.shown, name, loaded, time.perf_counter() - start)

    def _with_prefix(self, state: dict[str, Any]) -> dict[str, Any]:
        """Bare PEFT keys (a model's save_lora_adapter, PEFT's save_pretrained) belong to the denoiser.

        diffusers' pipelines load only keys under a component prefix ("transformer.", "unet.") or
        in a format they convert (kohya, musubi, lightx2v), and silently skip the rest.
        """
        peft_prefix = "base_model.model."
        if state and all(key.startswith(peft_prefix) for key in state):
            state = {key[len(peft_prefix):]: value for key, value in state.items()}
        if any(key.startswith(_COMPONENT_PREFIXES) for key in state):
            return state
        return {f"{self.denoiser}.{key}": value for key, value in state.items()}

    def _forget(self, name: str) -> None:
        """Remove whatever a failed load left of an adapter."""
        try:
            if any(name in getattr(layer, "lora_A", {}) for layer in _tuner_layers(self.components())):
                with _quiet_loading():
                    self.pipe.delete_adapters([name])
        except Exception:  # noqa: BLE001 - best effort; the layers of a failed load are disabled anyway
            log.exception("could not remove the adapter %s after a failed load", name)
        self.loaded.pop(name, None)

    def _evict(self, keep: set[str]) -> None:
        while len(self.loaded) > max(KEEP_LOADED, len(keep)):
            name = next(n for n in self.loaded if n not in keep)
            with _quiet_loading():
                self.pipe.delete_adapters([name])
            del self.loaded[name]
            log.info("LoRA adapter %s unloaded (least recently used)", name)

    def _fuse(self, names: list[str]) -> None:
        """Merge the active LoRAs into the denoiser's weights in place, keeping exact copies of the originals."""
        start = time.perf_counter()
        self.fused = True  # first: a failure part way leaves what it merged to the next job's restore
        denoiser = getattr(self.pipe, self.denoiser)
        for name, layer in _tuner_layers_named(denoiser):
            here = [n for n in names if n in getattr(layer, "lora_A", {})]
            if not here:
                continue
            base = layer.get_base_layer()
            self._originals[base] = {k: t.to("cpu", copy=True) for k, t in _weight_tensors(base).items()}
            if hasattr(base, "weight_scale"):  # a float8 layer (WAN_FP8): PEFT cannot add to float8 weights
                # Into the tensors compiled code has seen (PEFT's own merge swaps in new ones).
                delta = sum(layer.get_delta_weight(n) for n in here).detach().to(base.compute_dtype)
                for key, tensor in self.requantize(f"{name}.weight", delta).items():
                    getattr(base, key).copy_(tensor)
                layer.merged_adapters.extend(here)
            else:
                layer.merge(adapter_names=here)
        if self.unload_fused:
            with _quiet_loading():
                self.pipe.unload_lora_weights()
            self.loaded.clear()
        log.info("LoRAs fused into %d layers in %.2f s", len(self._originals), time.perf_counter() - start)

    def _restore(self) -> None:
        """Undo a fuse bit for bit: copy the original weights back (PEFT's unmerge subtracts, inexactly)."""
        for base, saved in self._originals.items():
            for key, tensor in _weight_tensors(base).items():
                tensor.copy_(saved[key])
        for layer in _tuner_layers([getattr(self.pipe, self.denoiser)]):  # none left if unloaded
            layer.merged_adapters.clear()
        self._originals.clear()
        self.fused = False


def _weight_tensors(linear: Any) -> dict[str, Any]:
    """The tensors holding a linear layer's weights (a float8 layer's scales too), by attribute name."""
    own = [*linear.named_parameters(recurse=False), *linear.named_buffers(recurse=False)]
    return {name: tensor.data for name, tensor in own}


def _misfit(err: Exception, state: dict[str, Any]) -> str:
    """What about a LoRA does not fit the model, from diffusers'/PEFT's exception."""
    text = str(err)
    if m := _SIZE_MISMATCH.search(text):
        return f"its weights for {m.group(1)} have shape {m.group(2)} where the model needs {m.group(3)}"
    if m := re.search(r"Target modules \{?([^},]*)", text):
        return f"none of its layers are in the model (for example {m.group(1).strip()[:80]})"
    if isinstance(err, KeyError):
        return f"the key {shorten(text.strip(chr(39)), 80)} its format requires is missing"
    if "lora" in text and "substring" in text:
        odd = next((key for key in state if "lora" not in key), "")
        return f"its keys are not in a LoRA format this model reads (for example {shorten(odd, 80)})"
    first = first_line(err, 160)
    return f"{type(err).__name__}: {first}"
