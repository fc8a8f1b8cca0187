# RunPod serverless worker: SDXL (base + refiner) images and Wan2.1-I2V-14B-480P videos.
#   docker build -t sdxl-wan-worker .                               # CUDA 13: hosts with NVIDIA driver R580+
#   docker build --build-arg BAKE_WEIGHTS=all -t sdxl-wan-worker .  # weights inside the image (needs ~35 GB of RAM)
#   docker build --build-arg CUDA_BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#                -t sdxl-wan-worker:cu126 .                         # CUDA 12.6: hosts with driver R560+ (R570 too)

# The base image fixes the CUDA version the host's driver must support: its NVIDIA_REQUIRE_CUDA makes
# the container runtime refuse to start it on an older driver. torch's wheel brings its own CUDA
# libraries, so the base only has to match torch's CUDA major version (README "GPU drivers and CUDA").
ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}

# Python only (Ubuntu 24.04's 3.12): imageio-ffmpeg ships its own ffmpeg (with libx264), so no system
# ffmpeg is needed. Distribution packages are left unpinned on purpose: the base tag fixes the
# release, and pinning would hold back its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment keeps pip away from the distribution's Python (PEP 668).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV

# Dependencies before the code, so a code change does not reinstall gigabytes of wheels.
# Empty TORCH_INDEX_URL: torch comes from PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build.
# Set, torch (the version pinned in requirements.txt) comes from that index first, e.g. PyTorch's
# cu126 index for the CUDA 12.6 base above; the next install then keeps it, since its pin is met.
ARG TORCH_INDEX_URL=""
COPY builder/requirements.txt /tmp/requirements.txt
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^torch==' /tmp/requirements.txt > /tmp/torch.txt \
        && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt; \
    fi \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Hugging Face cache on the RunPod network volume: RunPod's cached models live under
# /runpod-volume/huggingface-cache/hub, and weights fetched there survive worker restarts.
ENV HF_HOME=/runpod-volume/huggingface-cache \
    MODEL_DIR=/models

# The handler and every top-level module it imports, plus download_weights.py for BAKE_WEIGHTS
# (tests/test_deploy.py fails when a module is missing here). .dockerignore keeps tests,
# benchmarks and local caches out of the build context.
WORKDIR /app
COPY handler.py model_handler.py schemas.py settings.py storage.py video_utils.py fetch.py loras.py parallel.py \
     weights.py download_weights.py test_input.json ./

# Optional: bake weights into the image ("sdxl", "wan" or "all"); the worker finds them in
# /models/<name> (MODEL_DIR) before looking at the HF cache. Wan is re-saved in bf16 on the way,
# which loads its transformer into memory: the build needs about 35 GB of RAM.
ARG BAKE_WEIGHTS=""
RUN if [ "$BAKE_WEIGHTS" = "all" ]; then python download_weights.py --dir /models; \
    elif [ -n "$BAKE_WEIGHTS" ]; then python download_weights.py --only "$BAKE_WEIGHTS" --dir /models; fi

CMD ["python", "-u", "handler.py"]
