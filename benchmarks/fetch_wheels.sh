#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ and .whl-ffmpeg/ (git-ignored), to carry there.
#
# The GPU image (Python 3.12, torch 2.11, transformers 5.17, huggingface_hub 1.33, accelerate,
# safetensors, pillow, imageio, aiohttp, requests, tqdm, pyyaml, psutil, py-cpuinfo, click, colorama)
# lacks diffusers, imageio-ffmpeg, ftfy, runpod, torchao (WAN_FP8) and fa3-fwd (WAN_FP8_ATTENTION), and the few
# packages `import runpod` needs beyond it; peft comes too, pinned as the worker pins it (LoRAs). Run this here,
# where PyPI is reachable:   bash benchmarks/fetch_wheels.sh
# and on the GPU machine install them with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# imageio-ffmpeg: 0.8.x bundles ffmpeg 9 in a 68 MB wheel, past the 64 MiB a device call may carry;
# 0.7.0 (ffmpeg 7.0.2, same write_frames API) is 29.5 MB. IMAGEIO_FFMPEG=0.8.1 overrides.
# torchao 0.18.0 is the release built for torch 2.11 (the GPU image's); it loads its kernels from torch >= 2.11.
# EXTRA="name==version ..." adds packages. The whole set must stay under the 64 MiB a device call carries.
# PY_VERSION=3.11 fetches the same set for a local Python 3.11 check of the set's completeness.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
IMAGEIO_FFMPEG=${IMAGEIO_FFMPEG:-0.7.0}
packages=(
  diffusers==0.42.1
  # WAN_FP8_ATTENTION's FlashAttention-3 float8 kernel (Hopper; links CUDA 13's runtime, as the GPU's torch)
  fa3-fwd==0.0.3
  ftfy==6.3.1 wcwidth==0.9.4
  torchao==0.18.0 peft==0.21.2
  runpod==1.12.0
  # imported by `import runpod` (its CLI and SSH helpers load at import) and missing on the GPU image:
  aiohttp-retry==2.9.1 backoff==2.2.1 tomli==2.5.0 tomlkit==0.15.2 tqdm-loggable==0.4.1
  paramiko==5.1.0 invoke==3.0.3 bcrypt==5.0.0 pynacl==1.6.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
)
read -r -a extra <<< "${EXTRA:-}"
packages+=("${extra[@]}")
# Not carried: boto3 (storage.py imports it only when a bucket is configured), fastapi/uvicorn (only for
# --rp_serve_api), importlib_metadata (diffusers uses the standard library's on Python >= 3.8).

download() {  # FOLDER PACKAGE...
  rm -rf "$1"
  mkdir -p "$1"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 --platform any -d "$1" "${@:2}" 2> >(grep -v "^WARNING: Location" >&2)
  ls -1 "$1"
  du -cb "$1"/*.whl | tail -1 | awk '{printf "total: %.1f MB in %s\n", $1 / 1e6, "'"$1"'"}'
}
download "$DEST" "${packages[@]}"
# imageio-ffmpeg travels in a second carry (gpu_session.sh installs it at its next poll): with fa3-fwd
# beside it, one carry would pass 64 MiB.
download "$DEST-ffmpeg" "imageio-ffmpeg==${IMAGEIO_FFMPEG}"
