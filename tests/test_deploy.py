"""The deployment files agree with the code: RunPod Hub listing (.runpod/), Dockerfile, .dockerignore, the
image's package pins and what README and benchmarks/RESULTS.md say about them.

No models are loaded and nothing is built: these read the files, call the worker's own settings and input
validation, and replay the Dockerfile's dependency step with a stand-in pip.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

from settings import SettingsError, load_settings

HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
INPUTS = {entry["key"]: entry["input"] for entry in HUB["config"]["env"]}
# RunPod's GPU pools (runpod-python's GpuGroup) and their memory in GB; hub.json's gpuIds may also hold
# "-<GPU id>" negations. ADA_80_PRO is the H100 pool, HOPPER_141 the H200's.
GPU_POOLS = {"AMPERE_16": 16, "AMPERE_24": 24, "AMPERE_48": 48, "AMPERE_80": 80, "ADA_24": 24, "ADA_32_PRO": 32,
             "ADA_48_PRO": 48, "ADA_80_PRO": 80, "HOPPER_141": 141}
# The pools of the cards every speed figure ran on (benchmarks/RESULTS.md: one H100, one H200).
MEASURED_POOLS = {"ADA_80_PRO", "HOPPER_141"}
# RunPod's /run payload limit: a test input must fit in a request.
RUN_PAYLOAD_LIMIT = 10_000_000
# What a fresh worker (no volume, no cached model) downloads before it can serve each mode, in GB: SDXL's fp16
# files (base, refiner, fp16-fix VAE; README) and Wan2.1-I2V-14B-480P-Diffusers as the hub stores it
# (RESULTS.md section 4, from the hub's public file listing).
WEIGHTS_GB = {"image": 14.0, "video": 90.1}
# RunPod marks a worker unhealthy when its start takes longer (RUNPOD_INIT_TIMEOUT's default, RunPod's docs); the
# weights are fetched at start.
START_LIMIT_S = 7 * 60
# The download rate a Hub test may count on: an assumption (nothing here measured a RunPod host's rate from
# Hugging Face), chosen low so that a test passes on a slow host too.
ASSUMED_DOWNLOAD_GB_PER_S = 0.1


class RecordingEnv(Mapping):
    """An environment mapping that remembers every key the worker asks for."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.asked: set[str] = set()
        self.iterated = False

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self._values[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        self.asked.add(key)
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return key in self._values

    def __iter__(self) -> Iterator[str]:
        self.iterated = True
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def env_value(key: str, value: object) -> str:
    """A Hub default or preset value as the string the worker receives (booleans via trueValue/falseValue)."""
    if isinstance(value, bool):
        spec = INPUTS[key]
        return spec["trueValue"] if value else spec["falseValue"]
    return str(value)


def hub_defaults() -> dict[str, str]:
    return {key: env_value(key, spec["default"]) for key, spec in INPUTS.items()}


def preset_envs() -> list[tuple[str, dict[str, str]]]:
    return [(p["name"], {k: env_value(k, v) for k, v in p["defaults"].items()}) for p in HUB["config"]["presets"]]


def hub_pools() -> list[str]:
    """hub.json's GPU pools in its order of preference (negated GPU ids left out)."""
    return [p.strip() for p in HUB["config"]["gpuIds"].split(",") if not p.strip().startswith("-")]


def hub_test_env() -> dict[str, str]:
    return {item["key"]: item["value"] for item in TESTS["config"].get("env", [])}


def cuda_of_base_image() -> tuple[int, int]:
    """major.minor CUDA of the Dockerfile's default base image (ARG CUDA_BASE=nvidia/cuda:<x.y.z>-...)."""
    found = re.search(r"^ARG CUDA_BASE=nvidia/cuda:(\d+)\.(\d+)\.", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert found, "the Dockerfile's base image is not ARG CUDA_BASE=nvidia/cuda:<version>-..."
    return int(found[1]), int(found[2])


# ----------------------------------------------------------------------------------------------
# .runpod/hub.json and .runpod/tests.json
# ----------------------------------------------------------------------------------------------


def test_hub_json_has_the_fields_the_hub_reads():
    assert HUB["title"] and HUB["description"] and HUB["type"] == "serverless"
    assert HUB["category"] in ("audio", "embedding", "language", "video", "image")
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 20
    pools = hub_pools()
    assert pools and set(pools) <= set(GPU_POOLS), set(pools) - set(GPU_POOLS)
    for entry in config["env"]:
        spec = entry["input"]
        assert spec["name"] and spec["description"] and "default" in spec, entry["key"]
        assert spec["type"] in ("string", "number", "boolean", "huggingface"), entry["key"]
        for option in spec.get("options", []):
            assert set(option) == {"label", "value"}, entry["key"]
    for test in TESTS["tests"]:
        assert test["name"] and isinstance(test["input"], dict), test
    assert TESTS["config"]["gpuCount"] == 1 and TESTS["config"]["gpuTypeId"].startswith("NVIDIA ")


@pytest.mark.parametrize("where", ["hub.json", "tests.json"])
def test_allowed_cuda_versions_fit_the_image(where):
    """A host whose driver supports an older CUDA than the base image cannot start the container."""
    allowed = (HUB if where == "hub.json" else TESTS)["config"]["allowedCudaVersions"]
    image = cuda_of_base_image()
    assert allowed, "allowedCudaVersions is empty: RunPod would place workers on any driver"
    older = [v for v in allowed if tuple(int(part) for part in v.split(".")) < image]
    assert older == [], f"{where} allows CUDA {older} but the default image needs CUDA {image[0]}.{image[1]}"


def test_every_env_var_the_hub_files_name_is_one_the_worker_reads():
    named = set(INPUTS) | set(hub_test_env())
    for _, env in preset_envs():
        named |= set(env)
    bucket = {"BUCKET_ENDPOINT_URL": "https://s3.example.com", "BUCKET_ACCESS_KEY_ID": "key",
              "BUCKET_SECRET_ACCESS_KEY": "secret", "BUCKET_NAME": "results"}
    # Several environments, so that keys read only in some configurations (a bucket's name and region,
    # a lever's own options) are asked for too.
    runs = [{}, bucket, hub_defaults(), hub_test_env()] + [hub_defaults() | env for _, env in preset_envs()]
    asked: set[str] = set()
    iterated = False
    for values in runs:
        env = RecordingEnv(values)
        load_settings(env)
        asked |= env.asked
        iterated |= env.iterated
    unread = named - asked
    assert unread == set(), (f"load_settings never reads {sorted(unread)}"
                             + (" (it iterated over the whole mapping instead)" if iterated else ""))


@pytest.mark.parametrize("key", sorted(INPUTS))
def test_hub_inputs_are_values_the_worker_accepts(key, tmp_path):
    spec = INPUTS[key]
    default = env_value(key, spec["default"])
    try:
        loaded = load_settings({key: default})
    except SettingsError as err:
        pytest.fail(f"hub.json's default {key}={default!r} is refused by the worker: {err}")
    # Deploying with the form untouched gives the worker's own defaults (the Hub's image has MODEL_DIR=/models
    # and no volume)...
    assert loaded == load_settings({}), f"hub.json's default {key}={default!r} is not the worker's default"
    if key != "MODEL_DIR":
        # ...also next to weights in MODEL_DIR (a model id filled in by default would hide its folders).
        for folder in ("sdxl-base", "sdxl-refiner", "sdxl-vae", "wan-i2v"):
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "model_index.json").write_text("{}")
        base = {"MODEL_DIR": str(tmp_path)}
        assert load_settings(base | {key: default}) == load_settings(base), (
            f"hub.json's default {key}={default!r} hides the model folders in MODEL_DIR")
    choices = []
    if spec["type"] == "boolean":
        choices = [spec["trueValue"], spec["falseValue"]]
    elif spec.get("options"):
        choices = [option["value"] for option in spec["options"]]
        assert default in choices, f"{key}'s default {default!r} is not one of its options"
    elif spec["type"] == "number":
        choices = [str(spec[bound]) for bound in ("min", "max") if bound in spec]
    loaded = []
    for value in choices:
        try:
            loaded.append(load_settings({key: value}))
        except SettingsError as err:
            pytest.fail(f"hub.json offers {key}={value!r}, which the worker refuses: {err}")
    if spec["type"] == "boolean" or spec.get("options"):
        # Every choice must change what the worker does, or the worker is not reading this variable.
        assert len({repr(s) for s in loaded}) == len(choices), f"some of {key}'s choices {choices} change nothing"


@pytest.mark.parametrize("name,env", preset_envs(), ids=[name for name, _ in preset_envs()])
def test_hub_presets_are_configurations_the_worker_starts_with(name, env):
    assert set(env) <= set(INPUTS), f"preset {name!r} sets {set(env) - set(INPUTS)}, which have no input field"
    for key, value in env.items():
        options = [option["value"] for option in INPUTS[key].get("options", [])]
        assert not options or value in options, f"preset {name!r}: {key}={value!r} is not one of {options}"
    try:
        load_settings(hub_defaults() | env)
    except SettingsError as err:
        pytest.fail(f"preset {name!r} stops the worker at start-up: {err}")


def test_the_hub_form_offers_only_what_a_one_gpu_worker_runs():
    """A worker of the Hub's endpoint has gpuCount GPUs; NUM_GPUS above that stops it at start-up."""
    gpus = HUB["config"]["gpuCount"]
    offered = [INPUTS["NUM_GPUS"].get("max", float("inf"))] if "NUM_GPUS" in INPUTS else []
    offered += [int(env["NUM_GPUS"]) for _, env in preset_envs() if "NUM_GPUS" in env]
    assert all(count <= gpus for count in offered), f"the form offers NUM_GPUS up to {max(offered)} on {gpus} GPU"


def test_the_hub_gpu_list_follows_the_readme():
    """RunPod tries the pools in order: the cards the figures ran on first, none below README's advice."""
    advice = re.search(r"(\d+) GB cards \(L40S", readme_section("Deploying on RunPod"))
    assert advice, "README's walk-through no longer names the smallest card it advises"
    pools = hub_pools()
    too_small = [pool for pool in pools if GPU_POOLS[pool] < int(advice[1])]
    assert too_small == [], f"hub.json offers {too_small}, below README's {advice[1]} GB"
    assert pools[0] in MEASURED_POOLS, f"hub.json's first GPU pool {pools[0]} is not a card the figures ran on"
    memory = [GPU_POOLS[pool] >= 80 for pool in pools]
    assert memory == sorted(memory, reverse=True), f"{pools}: a 48 GB pool comes before an 80 GB one"


def test_the_model_ids_are_hugging_face_inputs():
    """The Hub form shows the model ids as Hugging Face model fields (RunPod's `huggingface` input type)."""
    for key in ("SDXL_MODEL_ID", "SDXL_REFINER_ID", "SDXL_VAE_ID", "WAN_MODEL_ID"):
        assert INPUTS[key]["type"] == "huggingface", key
        default = INPUTS[key]["default"]
        assert default == "" or re.fullmatch(r"[\w.-]+/[\w.-]+", default), (key, default)


def test_hub_tests_run_on_a_worker_without_a_volume():
    """Hub tests get no network volume and no cached model: nothing may point at /runpod-volume."""
    env = hub_test_env()
    assert not [key for key, value in env.items() if "/runpod-volume" in value], env
    modes = [test["input"].get("mode", "image") for test in TESTS["tests"]]
    assert "image" in modes, "tests.json no longer tests an image job"
    for test in TESTS["tests"]:
        assert len(json.dumps({"input": test["input"]})) < RUN_PAYLOAD_LIMIT, test["name"]


@pytest.mark.parametrize("test", TESTS["tests"], ids=[t["name"] for t in TESTS["tests"]])
def test_each_hub_test_fetches_its_weights_in_time(test):
    """A fresh test worker fetches the weights of the test's mode at start: they must fit the container disk,
    arrive within RunPod's start-up limit, and leave the test's own time limit room for the job."""
    needed_gb = WEIGHTS_GB[test["input"].get("mode", "image")]
    assert needed_gb < HUB["config"]["containerDiskInGb"], test["name"]
    download_s = needed_gb / ASSUMED_DOWNLOAD_GB_PER_S
    assert download_s <= START_LIMIT_S, (
        f"{test['name']}: {needed_gb} GB at {ASSUMED_DOWNLOAD_GB_PER_S} GB/s takes {download_s:.0f} s, past "
        f"RunPod's {START_LIMIT_S} s start-up limit")
    assert test["timeout"] >= 1000 * (download_s + 120), f"{test['name']}: no time left for loading and the job"


def test_the_container_disk_holds_both_models_and_the_lora_cache():
    """Without a volume every model a worker fetches lands on its container disk (the Hub's default)."""
    lora_cache_gb = load_settings(hub_defaults()).lora_cache_bytes / 1024**3
    assert sum(WEIGHTS_GB.values()) + lora_cache_gb < HUB["config"]["containerDiskInGb"]


@pytest.mark.parametrize("test", TESTS["tests"], ids=[t["name"] for t in TESTS["tests"]])
def test_hub_test_inputs_pass_the_workers_validation(test):
    from schemas import validate_input

    validate_input(test["input"], load_settings(hub_test_env()))
    url = test["input"].get("image_url")
    if url:  # the embedded start frame is a real image of the requested shape
        header, _, payload = url.partition(",")
        assert header == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.verify()
            width, height = image.size
        if "width" in test["input"]:  # same aspect ratio: nothing is cropped away
            assert width * test["input"]["height"] == height * test["input"]["width"]


# ----------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ----------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of the Dockerfile (or of `text`), continuation lines joined, comments
    dropped."""
    joined, current = [], ""
    for line in ((ROOT / "Dockerfile").read_text() if text is None else text).splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            joined.append(current.strip())
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def copied_sources(dockerfile: str | None = None) -> list[str]:
    sources = []
    for instruction, args in dockerfile_instructions(dockerfile):
        if instruction in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    return sources


def copied(path: str, sources: list[str]) -> bool:
    """Whether a COPY source brings `path` into the image: a file (pattern) matching it, or a folder above it."""
    return any(fnmatch.fnmatchcase(path, source) or path.startswith(source.rstrip("/") + "/") for source in sources)


def module_files(name: str, root: Path = ROOT) -> list[str]:
    """The files of the repository's top-level module `name`, relative to `root`: name.py, or every .py file
    of the package name/; none for a module from elsewhere."""
    if (root / f"{name}.py").is_file():
        return [f"{name}.py"]
    if (root / name / "__init__.py").is_file():
        return sorted(path.relative_to(root).as_posix() for path in (root / name).rglob("*.py")
                      if "__pycache__" not in path.parts)
    return []


def repository_imports(path: str, root: Path = ROOT) -> set[str]:
    """Top-level modules and packages of the repository that the file `path` imports anywhere (functions
    included; a package's relative imports stay inside the package, all of whose files are counted)."""
    names = set()
    for node in ast.walk(ast.parse((root / path).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if module_files(name, root)}


def files_the_image_runs(root: Path = ROOT, dockerfile: str | None = None) -> set[str]:
    """handler.py, every script a RUN/CMD line names, and the files of every repository module and package
    they import, transitively."""
    modules = {"handler"}
    for instruction, args in dockerfile_instructions(dockerfile):
        if instruction in ("RUN", "CMD"):
            modules |= {name for name in re.findall(r"([A-Za-z_]\w*)\.py\b", args) if (root / f"{name}.py").is_file()}
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            for path in module_files(module, root):
                todo += repository_imports(path, root) - seen
    return {path for module in seen for path in module_files(module, root)}


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(is_exception, regex) per .dockerignore line, in Docker's syntax (*, ?, **, leading !)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((exception, re.compile(regex)))
    return patterns


def ignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching line decides, and a
    line matching a parent folder covers everything under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exception, regex in dockerignore_patterns():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not exception
    return result


def test_dockerfile_copies_every_module_the_image_runs():
    needed = files_the_image_runs()
    # The import scan itself must see the handler's modules, or this test would pass on nothing.
    assert {"handler.py", "schemas.py", "settings.py", "download_weights.py"} <= needed
    sources = copied_sources()
    missing = {path for path in needed if not copied(path, sources)}
    assert missing == set(), f"the Dockerfile does not COPY {sorted(missing)}"
    left_out = {m for m in needed | {"builder/requirements.txt", "test_input.json"} if ignored(m)}
    assert left_out == set(), f".dockerignore leaves {sorted(left_out)} out of the build context"


def test_the_module_scan_follows_packages(tmp_path):
    # Guards the scan above on a made-up repository: a package imported by the handler counts with all its
    # files and what they import, and only copying its folder brings it into the image.
    files = {"handler.py": "import settings\n\ndef main():\n    from models.wan import Wan\n",
             "settings.py": "", "models/__init__.py": "", "models/wan.py": "from . import base\nimport video_utils\n",
             "models/base.py": "", "video_utils.py": "import numpy\n", "unused.py": ""}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    dockerfile = 'COPY handler.py settings.py video_utils.py ./\nCOPY models/ ./models/\nCMD ["python", "handler.py"]\n'
    needed = files_the_image_runs(tmp_path, dockerfile)
    assert needed == set(files) - {"unused.py"}
    assert all(copied(path, copied_sources(dockerfile)) for path in needed)
    assert not copied("models/wan.py", ["handler.py", "models.py", "models/base.py"])


def test_copied_files_exist():
    for source in copied_sources():
        assert list(ROOT.glob(source)), f"the Dockerfile copies {source}, which does not exist"


@pytest.mark.parametrize("path", [
    ".git/HEAD", ".venv/bin/python", "models/tiny/wan-i2v/model_index.json", "outputs/local_test/video.mp4",
    "tests/test_deploy.py", "benchmarks/bench.py", "benchmarks/results/levers-1.json", "__pycache__/handler.pyc",
    "tests/__pycache__/conftest.pyc", ".pytest_cache/v/cache", ".ruff_cache/CACHEDIR.TAG",
    ".hypothesis/examples/x", ".whl/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", ".bench/run.json",
    ".whl-ffmpeg/imageio_ffmpeg-0.7.0-py3-none-manylinux2014_x86_64.whl",
])
def test_dockerignore_keeps_local_state_out_of_the_build_context(path):
    assert ignored(path), f"{path} would be sent to docker build"


def test_dockerignore_matcher_can_say_no():
    # Guards the helper above: a matcher that ignores everything would pass the test before it.
    assert not ignored("handler.py") and not ignored("builder/requirements.txt")
    # models/ is the worker's package; only the tiny test models inside it stay out.
    assert not ignored("models/__init__.py") and ignored("models/tiny/wan-i2v/model_index.json")


# ----------------------------------------------------------------------------------------------
# The image's packages: what it installs, and that README and RESULTS.md say the same
# ----------------------------------------------------------------------------------------------
BUILDER = ROOT / "builder"
# The packages whose versions the figures depend on and RESULTS.md states.
STACK = ("torch", "transformers", "diffusers", "fa3-fwd", "runpod")


def package_name(requirement: str) -> str:
    """The normalised name of a requirement line (PEP 503: case and runs of -_. do not matter)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9_.-]+)", requirement)[1]).lower()


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def pins(lines: list[str]) -> dict[str, str]:
    return {package_name(line): line.split("==", 1)[1].strip() for line in lines if "==" in line}


def image_pins() -> dict[str, str]:
    """What the default image pins: requirements.txt, with requirements-image.txt's versions in place of its
    own, and requirements-cuda13.txt (the default image's torch is a CUDA 13 build)."""
    return (pins(requirement_lines(BUILDER / "requirements.txt"))
            | pins(requirement_lines(BUILDER / "requirements-image.txt"))
            | pins(requirement_lines(BUILDER / "requirements-cuda13.txt")))


def readme_section(title: str) -> str:
    """README's section under the heading `title`, up to the next heading of the same or a higher level."""
    text = (ROOT / "README.md").read_text()
    heading = re.search(rf"^(#+) {re.escape(title)}\n", text, flags=re.M)
    assert heading, f"README has no section {title!r}"
    end = re.compile(rf"^#{{1,{len(heading[1])}}} ", flags=re.M).search(text, heading.end())
    return text[heading.end():end.start() if end else len(text)]


def apt_packages() -> set[str]:
    packages = set()
    for instruction, args in dockerfile_instructions():
        if instruction == "RUN":
            for command in re.findall(r"apt-get install ([^&;|]+)", args):
                packages |= {word for word in command.split() if not word.startswith("-")}
    return packages


def test_the_image_has_what_torch_compile_builds_with():
    # triton builds its kernel launcher at run time with a C compiler (gcc, or clang, or $CC) and Python's
    # headers (sysconfig's include folder: /usr/include/python3.12 on Ubuntu 24.04, from python3-dev);
    # `--no-install-recommends` leaves out libc6-dev, which gcc only recommends; inductor compiles graph parts
    # that run on the CPU with g++. Without them WAN_COMPILE and SDXL_COMPILE fail at their first kernel.
    assert "--no-install-recommends" in " ".join(args for _, args in dockerfile_instructions())
    missing = {"gcc", "g++", "libc6-dev", "python3-dev"} - apt_packages()
    assert missing == set(), f"the image does not install {sorted(missing)}"


def test_the_image_installs_the_stack_the_figures_ran_with():
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    image = image_pins()
    for name in STACK:
        stated = set(re.findall(rf"\b{re.escape(name)} (\d+(?:\.\d+)+)", results))
        assert stated, f"RESULTS.md names no version of {name}"
        assert stated == {image[name]}, f"the figures ran with {name} {sorted(stated)}, the image has {image[name]}"
    # The CUDA build too: RESULTS.md's torch 2.11.0+cu130 is PyPI's wheel, which needs the CUDA 13.0 base image.
    builds = set(re.findall(r"\btorch \d+(?:\.\d+)+\+cu(\d+)", results))
    assert builds == {"".join(map(str, cuda_of_base_image()))}, (builds, cuda_of_base_image())


def test_readme_names_what_the_image_installs():
    section = readme_section("The image, GPU drivers and CUDA")
    image = image_pins()
    unnamed = [f"{name} {image[name]}" for name in STACK if f"{name} {image[name]}" not in section]
    assert unnamed == [], f"README's image section does not name {unnamed}"
    # A package of the measured stack the image installs in another version must be named with both.
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for name, version in re.findall(r"\b([a-z][\w-]*) (\d+\.\d+\.\d+)\b", results):
        if name in image and image[name] != version:
            assert f"{name} {version}" in section and image[name] in section, (name, version, image[name])
    # And the test suite's own torch, which is not the image's.
    dev_torch = pins(requirement_lines(BUILDER / "requirements.txt"))["torch"]
    assert f"torch {dev_torch}" in section


def test_every_cuda_variant_pairs_its_base_image_with_a_torch_of_the_same_cuda():
    """A CUDA 12.8 base with a CUDA 13 torch would start on R570 hosts and fail at the first kernel."""
    for name in ("Dockerfile", "README.md"):
        text = (ROOT / name).read_text()
        variants = re.findall(r"CUDA_BASE=nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+.{0,200}?TORCH_INDEX_URL=\S*/cu(\d+)",
                              text, flags=re.S)
        assert variants, f"{name} shows no CUDA variant build"
        for major, minor, torch_cuda in variants:
            assert torch_cuda == f"{major}{minor}", f"{name}: base CUDA {major}.{minor} with torch cu{torch_cuda}"


PIP_STAND_IN = """#!/bin/sh
# Records the call and the requirement lines of every -r file, in place of installing anything.
{
  echo "CALL $*"
  while [ $# -gt 0 ]; do
    if [ "$1" = "-r" ]; then grep -vE '^[[:space:]]*(#|$)' "$2" | sed 's/^/REQ /'; shift; fi
    shift
  done
} >> "$PIP_LOG"
"""


def replay_dependency_step(tmp_path: Path, torch_cuda: str, index_url: str = "") -> list[dict]:
    """Run the Dockerfile's dependency RUN line as `docker build` would (sh, the files its COPY line brings,
    TORCH_INDEX_URL), with a pip that records what it is asked to install and a torch of the given CUDA."""
    instructions = dockerfile_instructions()
    copy = next(args.split() for instruction, args in instructions
                if instruction == "COPY" and "builder/requirements-image.txt" in args)
    sources, dest = copy[:-1], copy[-1].rstrip("/")
    run = next(args for instruction, args in instructions if instruction == "RUN" and f"{dest}/" in args)
    builder = tmp_path / "builder"
    builder.mkdir()
    for source in sources:
        shutil.copy(ROOT / source, builder)
    bin_dir, fake = tmp_path / "bin", tmp_path / "fake" / "torch"
    bin_dir.mkdir()
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"class version:\n    cuda = {torch_cuda!r}\n")
    (bin_dir / "pip").write_text(PIP_STAND_IN)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(tmp_path / "fake"), "PIP_LOG": str(log),
           "TORCH_INDEX_URL": index_url}
    done = subprocess.run(["sh", "-c", run.replace(dest, str(builder))], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = []
    for line in log.read_text().splitlines():
        if line.startswith("CALL "):
            calls.append({"args": line[5:].split(), "requirements": []})
        else:
            calls[-1]["requirements"].append(line[4:])
    return calls


def installed(calls: list[dict]) -> list[str]:
    return [line for call in calls if call["args"][0] == "install" for line in call["requirements"]]


def test_the_default_image_installs_the_gpu_stack_in_place_of_the_test_suites(tmp_path):
    calls = replay_dependency_step(tmp_path, torch_cuda="13.0")
    lines = installed(calls)
    names = [package_name(line) for line in lines]
    assert len(names) == len(set(names)), f"a package is asked for twice: {sorted(lines)}"
    assert pins(lines) == image_pins()
    runtime = requirement_lines(BUILDER / "requirements.txt")
    replaced = set(pins(requirement_lines(BUILDER / "requirements-image.txt")))
    assert {line for line in runtime if package_name(line) not in replaced} <= set(lines)
    assert not {line for line in runtime if package_name(line) in replaced} & set(lines)
    assert calls[-1]["args"] == ["check"], "the build does not end with pip check"


def test_the_cuda_12_image_takes_torch_from_its_index_and_leaves_out_fa3(tmp_path):
    url = "https://download.pytorch.org/whl/cu128"
    calls = replay_dependency_step(tmp_path, torch_cuda="12.8", index_url=url)
    image_torch = pins(requirement_lines(BUILDER / "requirements-image.txt"))["torch"]
    first = calls[0]
    assert "--index-url" in first["args"] and first["args"][first["args"].index("--index-url") + 1] == url
    assert first["requirements"] == [f"torch=={image_torch}"]
    lines = installed(calls)
    assert pins(lines)["torch"] == image_torch
    cuda13_only = set(pins(requirement_lines(BUILDER / "requirements-cuda13.txt")))
    assert cuda13_only and not cuda13_only & {package_name(line) for line in lines}
