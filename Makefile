# Two entry points do all set-up on a fresh machine (Python 3.11+ with venv, make):
#   make demo   -> a video from test_input.json on the tiny models, written to outputs/local_test/video.mp4
#   make test   -> the test suite (CPU, tiny models)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TINY := models/tiny

.PHONY: setup demo test lint
setup: $(VENV)/.installed $(TINY)/.built

$(VENV)/.installed: builder/requirements.txt builder/requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r builder/requirements.txt -r builder/requirements-dev.txt
	touch $@

$(TINY)/.built: download_weights.py $(VENV)/.installed
	$(PY) download_weights.py --tiny $(TINY)
	touch $@

demo: setup
	MODEL_DIR=$(TINY) $(PY) handler.py

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile
