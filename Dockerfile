# RunPod serverless worker: SDXL (base + refiner) images and Wan2.1-I2V-14B-480P videos.
#   docker build -t sdxl-wan-worker .                                  # weights from the network volume / HF cache
#   docker build --build-arg BAKE_WEIGHTS=all -t sdxl-wan-worker .     # weights inside the image (~85 GB)
# The torch wheel brings its own CUDA 13 libraries; the base image supplies a matching runtime.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

# Python only: imageio-ffmpeg ships its own ffmpeg (with libx264), so no system ffmpeg is needed.
# Distribution packages are left unpinned on purpose: the base tag fixes the release, and
# pinning would hold back its security updates.
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

# Dependencies first, so code changes do not reinstall 5 GB of wheels.
COPY builder/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

# Hugging Face cache on the RunPod network volume: RunPod's cached models live under
# /runpod-volume/huggingface-cache/hub, and weights fetched there survive worker restarts.
ENV HF_HOME=/runpod-volume/huggingface-cache \
    MODEL_DIR=/models

WORKDIR /app
COPY handler.py model_handler.py schemas.py settings.py storage.py video_utils.py loras.py download_weights.py \
     test_input.json ./

# Optional: bake weights into the image ("sdxl", "wan" or "all"); the worker finds them in
# /models/<name> (MODEL_DIR) before looking at the HF cache.
ARG BAKE_WEIGHTS=""
RUN if [ "$BAKE_WEIGHTS" = "all" ]; then python download_weights.py --dir /models; \
    elif [ -n "$BAKE_WEIGHTS" ]; then python download_weights.py --only "$BAKE_WEIGHTS" --dir /models; fi

CMD ["python", "-u", "handler.py"]
