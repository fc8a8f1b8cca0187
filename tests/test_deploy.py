"""The deployment files agree with the code: RunPod Hub listing (.runpod/), Dockerfile, .dockerignore.

No models are loaded: these read the files and call the worker's own settings and input validation.
"""

from __future__ import annotations

import ast
import base64
import fnmatch
import io
import json
import re
from collections.abc import Iterator, Mapping

import pytest
from conftest import ROOT
from PIL import Image

from settings import SettingsError, load_settings

HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
INPUTS = {entry["key"]: entry["input"] for entry in HUB["config"]["env"]}
# RunPod's GPU pools (runpod-python's GpuGroup); hub.json's gpuIds may also hold "-<GPU id>" negations.
GPU_POOLS = {"AMPERE_16", "AMPERE_24", "AMPERE_48", "AMPERE_80", "ADA_24", "ADA_32_PRO", "ADA_48_PRO", "ADA_80_PRO",
             "HOPPER_141"}
# Hub defaults that deliberately differ from the worker's own default: the Hub deploys onto a network volume.
DEPLOYMENT_CHOICES = {"MODEL_DIR"}
# RunPod's /run payload limit: a test input must fit in a request.
RUN_PAYLOAD_LIMIT = 10_000_000


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
    pools = [p.strip() for p in config["gpuIds"].split(",") if not p.strip().startswith("-")]
    assert pools and set(pools) <= GPU_POOLS, set(pools) - GPU_POOLS
    for entry in config["env"]:
        spec = entry["input"]
        assert spec["name"] and spec["description"] and "default" in spec, entry["key"]
        assert spec["type"] in ("string", "number", "boolean"), entry["key"]
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
        load_settings({key: default})
    except SettingsError as err:
        pytest.fail(f"hub.json's default {key}={default!r} is refused by the worker: {err}")
    if key not in DEPLOYMENT_CHOICES:
        # Deploying with the form untouched gives the worker's own defaults, also next to baked weights
        # (a model id filled in by default would hide MODEL_DIR's folders).
        for folder in ("sdxl-base", "sdxl-refiner", "sdxl-vae", "wan-i2v"):
            (tmp_path / folder).mkdir()
            (tmp_path / folder / "model_index.json").write_text("{}")
        base = {"MODEL_DIR": str(tmp_path)}
        assert load_settings(base | {key: default}) == load_settings(base), (
            f"hub.json's default {key}={default!r} is not the worker's default")
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


def test_hub_tests_cover_both_modes():
    modes = sorted(test["input"].get("mode", "image") for test in TESTS["tests"])
    assert modes == ["image", "video"]
    for test in TESTS["tests"]:
        # Milliseconds; the first job of a worker also loads its model from disk.
        assert test["timeout"] >= 120_000, test["name"]
        assert len(json.dumps({"input": test["input"]})) < RUN_PAYLOAD_LIMIT, test["name"]


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


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
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


def copied_sources() -> list[str]:
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    return sources


def top_level_imports(module: str) -> set[str]:
    """Top-level modules of this repository that `module` imports anywhere (functions included)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if (ROOT / f"{name}.py").is_file()}


def modules_the_image_runs() -> set[str]:
    """handler.py, every script a RUN/CMD line names, and every repository module they import, transitively."""
    scripts = {"handler"}
    for instruction, args in dockerfile_instructions():
        if instruction in ("RUN", "CMD"):
            scripts |= {name for name in re.findall(r"([A-Za-z_]\w*)\.py\b", args) if (ROOT / f"{name}.py").is_file()}
    seen, todo = set(), list(scripts)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += top_level_imports(module) - seen
    return {f"{module}.py" for module in seen}


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
    needed = modules_the_image_runs()
    # The import scan itself must see the handler's modules, or this test would pass on nothing.
    assert {"handler.py", "model_handler.py", "schemas.py", "settings.py", "download_weights.py"} <= needed
    sources = copied_sources()
    missing = {m for m in needed if not any(fnmatch.fnmatchcase(m, source) for source in sources)}
    assert missing == set(), f"the Dockerfile does not COPY {sorted(missing)}"
    left_out = {m for m in needed | {"builder/requirements.txt", "test_input.json"} if ignored(m)}
    assert left_out == set(), f".dockerignore leaves {sorted(left_out)} out of the build context"


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
