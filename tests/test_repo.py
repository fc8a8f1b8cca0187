"""The repository keeps its promises: docs match the code, the image lints, CI runs the README's command."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

import schemas
import settings


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_parameter_tables_match_the_schema():
    text = readme()
    start = text.index("<!-- parameters:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- parameters:end -->")
    assert text[start:end].strip() == schemas.markdown_tables().strip()


def test_every_setting_the_worker_reads_is_documented():
    source = (ROOT / "settings.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)"', source))
    read -= {"RUNPOD_DEBUG_LEVEL", "RUNPOD_WEBHOOK_GET_JOB"}  # documented in RUNPOD_LOG_LEVEL's row; RunPod's marker
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme(), flags=re.M))
    assert read - documented == set()
    assert settings.BUCKET_VARS[0] in documented


def test_ci_runs_the_readme_test_command():
    assert "\nmake test\n" in readme()
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


def test_dockerfile_has_no_hadolint_findings():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    out = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_copies_every_module_the_handler_imports():
    dockerfile = (ROOT / "Dockerfile").read_text()
    modules = {p.name for p in ROOT.glob("*.py")}
    sources = [word for line in dockerfile.splitlines() if line.startswith("COPY") for word in line.split()[1:-1]]
    copied = {name for name in modules if any(fnmatch.fnmatchcase(name, source) for source in sources)}
    assert modules <= copied, modules - copied
    assert 'CMD ["python", "-u", "handler.py"]' in dockerfile


def test_code_is_ruff_clean():
    ruff = shutil.which("ruff") or str(ROOT / ".venv" / "bin" / "ruff")
    out = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("pin", ["torch==2.13.0", "diffusers==0.42.1", "runpod==1.12.0", "transformers==5."])
def test_requirements_are_pinned(pin):
    assert pin in (ROOT / "builder" / "requirements.txt").read_text()


def test_settings_is_a_pure_function_of_the_environment(tmp_path):
    env = {"MODEL_DIR": str(tmp_path)}
    assert settings.load_settings(env).wan_model_id == settings.DEFAULT_WAN_MODEL_ID
    (tmp_path / "wan-i2v").mkdir()
    (tmp_path / "wan-i2v" / "model_index.json").write_text("{}")
    assert settings.load_settings(env).wan_model_id == str(tmp_path / "wan-i2v")
    assert settings.load_settings(env | {"WAN_MODEL_ID": "me/wan"}).wan_model_id == "me/wan"
    with pytest.raises(settings.SettingsError, match="PRELOAD_MODELS may list 'sdxl' and 'wan', got 'flux'."):
        settings.load_settings({"PRELOAD_MODELS": "sdxl,flux"})



def test_settings_read_only_the_mapping_they_are_given(monkeypatch):
    monkeypatch.setenv("WAN_MODEL_ID", "from/process-env")
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://s3.example.com/half-configured")
    loaded = settings.load_settings({"MODEL_DIR": "/nonexistent"})
    assert loaded.wan_model_id == settings.DEFAULT_WAN_MODEL_ID
    assert loaded.bucket is None
    assert loaded == settings.load_settings({"MODEL_DIR": "/nonexistent"})


def test_the_start_up_settings_line_keeps_a_signed_lora_url_out_of_the_log():
    url = "https://example.com/fast.safetensors?X-Amz-Signature=SECRET"
    loaded = settings.load_settings({"WAN_FAST_LORA": url, "WAN_COMPILE": "1"})
    assert loaded.wan_fast_lora == url
    assert loaded.summary() == "wan_compile=True"
    assert "SECRET" not in repr(loaded)


def test_runpods_own_log_level_variable_is_honoured_unless_ours_is_set():
    assert settings.load_settings({}).runpod_log_level == "INFO"
    assert settings.load_settings({"RUNPOD_DEBUG_LEVEL": "error"}).runpod_log_level == "ERROR"
    both = {"RUNPOD_DEBUG_LEVEL": "ERROR", "RUNPOD_LOG_LEVEL": "WARN"}
    assert settings.load_settings(both).runpod_log_level == "WARN"
    with pytest.raises(settings.SettingsError, match="RUNPOD_DEBUG_LEVEL must be one of NOTSET, TRACE, DEBUG"):
        settings.load_settings({"RUNPOD_DEBUG_LEVEL": "loud"})
