# RunPod serverless worker: SDXL (base + refiner) images and Wan2.1-I2V-14B-480P videos.
#   docker build -t sdxl-wan-worker .                               # CUDA 13.0: hosts with NVIDIA driver R580+
#   docker build --build-arg CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                -t sdxl-wan-worker:cu128 .                         # CUDA 12.8: driver R570+, no float8 attention
#   docker build --build-arg BAKE_WEIGHTS=all -t sdxl-wan-worker .  # weights inside the image (needs ~35 GB of RAM)

# The base image fixes the CUDA version the host's driver must support: its NVIDIA_REQUIRE_CUDA makes
# the container runtime refuse to start it on an older driver. torch's wheel brings its own CUDA
# libraries, so the base only has to match torch's CUDA version (README "The image, GPU drivers and CUDA").
ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}

# Python (Ubuntu 24.04's 3.12) and what torch.compile (WAN_COMPILE, SDXL_COMPILE) builds with at run time:
# triton compiles its kernel launcher with a C compiler (gcc; libc6-dev holds the C library's headers and
# link files, which gcc only recommends) against Python's headers (python3-dev:
# /usr/include/python3.12/Python.h); inductor compiles any part of a graph that runs on the CPU as C++ (g++).
# imageio-ffmpeg ships its own ffmpeg (with libx264), so no system ffmpeg is needed. Distribution packages
# are left unpinned on purpose: the base tag fixes the release, and pinning would hold back its security
# updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc g++ libc6-dev \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment keeps pip away from the distribution's Python (PEP 668).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV

# Dependencies before the code, so a code change does not reinstall gigabytes of wheels.
# builder/requirements-image.txt (torch 2.11.0, transformers 5.17.0: the stack the GPU figures ran with)
# replaces requirements.txt's pins of the same packages, which are the CPU test suite's.
# Empty TORCH_INDEX_URL: torch comes from PyPI, whose torch 2.11.0 Linux x86_64 wheel is the CUDA 13.0 build.
# Set, torch (the version pinned in requirements-image.txt) comes from that index first, e.g. PyTorch's cu128
# index for the CUDA 12.8 base above; the next install keeps it, since its pin is met.
# builder/requirements-cuda13.txt (fa3-fwd, float8 attention) is installed only beside a CUDA 13 torch: its
# kernels link CUDA 13's runtime. `pip check` fails the build on a broken set.
ARG TORCH_INDEX_URL=""
COPY builder/requirements.txt builder/requirements-image.txt builder/requirements-cuda13.txt /tmp/builder/
RUN sed -nE 's/^([A-Za-z0-9_.-]+)==.*/^\1==/p' /tmp/builder/requirements-image.txt > /tmp/builder/replaced \
    && grep -viEf /tmp/builder/replaced /tmp/builder/requirements.txt > /tmp/builder/requirements-rest.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^torch==' /tmp/builder/requirements-image.txt > /tmp/builder/torch.txt \
        && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /tmp/builder/torch.txt; \
    fi \
    && pip install --no-cache-dir -r /tmp/builder/requirements-image.txt -r /tmp/builder/requirements-rest.txt \
    && if python -c 'import sys, torch; sys.exit(not (torch.version.cuda or "").startswith("13."))'; then \
        pip install --no-cache-dir -r /tmp/builder/requirements-cuda13.txt; \
    fi \
    && pip check \
    && rm -rf /tmp/builder

# Hugging Face cache on the RunPod network volume: RunPod's cached models live under
# /runpod-volume/huggingface-cache/hub, and weights fetched there survive worker restarts.
ENV HF_HOME=/runpod-volume/huggingface-cache \
    MODEL_DIR=/models

# The handler and every module it imports (the top-level ones and the models/ package), plus
# download_weights.py for BAKE_WEIGHTS (tests/test_deploy.py fails when a module is missing here).
# .dockerignore keeps tests, benchmarks, the tiny test models and local caches out of the build context.
WORKDIR /app
COPY *.py test_input.json ./
COPY models/ ./models/

# Optional: bake weights into the image ("sdxl", "wan" or "all"); the worker finds them in
# /models/<name> (MODEL_DIR) before looking at the HF cache. Wan is re-saved in bf16 on the way,
# which loads its transformer into memory: the build needs about 35 GB of RAM.
ARG BAKE_WEIGHTS=""
RUN if [ "$BAKE_WEIGHTS" = "all" ]; then python download_weights.py --dir /models; \
    elif [ -n "$BAKE_WEIGHTS" ]; then python download_weights.py --only "$BAKE_WEIGHTS" --dir /models; fi

CMD ["python", "-u", "handler.py"]
