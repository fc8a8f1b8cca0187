#!/usr/bin/env bash
# Run a list of benchmark steps on the lent GPU machine, in the background, so that the machine
# works while the device tool's 10-minute calls only poll. Each step writes RES/<step>/ (bench.json,
# bench.md or the probe's JSON, and log.txt); RES/progress.log says what started and ended.
#
#   setsid nohup bash benchmarks/gpu_session.sh cold-serial cold-parallel ... >/dev/null 2>&1 &
#   sleep 560; tar czf "$OUT/res.tgz" -C /tmp res; cat /tmp/res/progress.log     # each poll
#
# Expects the wheels installed into /tmp/site (benchmarks/README.md) and PYTHONPATH set by the caller.
set -u
cd "$(dirname "$0")/.."
RES=${RES:-/tmp/res}
W=${WORKDIR:-/tmp/bench-models}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1

run_step() {
  local name=$1
  local out="$RES/$name"
  mkdir -p "$out"
  local cmd
  case $name in
    # Builds both model groups (5 GB shards), then the disk's read speed and a cold start.
    cold-serial) cmd=(benchmarks/bench.py --quick --impl worker --only build,disk,cold --budget-s 0) ;;
    # The same cold start with diffusers loading the transformer's shards on 8 threads.
    cold-parallel) cmd=(benchmarks/bench.py --quick --impl worker --only cold --budget-s 0
                        --set HF_ENABLE_PARALLEL_LOADING=yes) ;;
    levers-vae) cmd=(benchmarks/levers.py --only vae) ;;  # builds its own VAE: no --workdir
    # 40 real steps, worker with its speed levers then plain diffusers, one process.
    full-video81) cmd=(benchmarks/bench.py --full --only video81 --no-evict-loads --budget-s 0
                       --set WAN_FP8=1 --set WAN_COMPILE=1 --set WAN_VAE_DTYPE=bfloat16) ;;
    fast-preset) cmd=(benchmarks/fast_preset.py --jobs fast_fused,fast_fused_again
                      --set WAN_COMPILE=1 --set WAN_VAE_DTYPE=bfloat16) ;;
    sdxl-speed) cmd=(benchmarks/sdxl_speed.py --budget-s 420) ;;
    build-sdxl) cmd=(benchmarks/bench.py --quick --only image --impl plain --image-steps 2,2 --budget-s 0) ;;
    # The worker's own SDXL, warmed up as at start-up, against the plain model-card pipelines.
    sdxl-worker) cmd=(benchmarks/sdxl_speed.py --only worker --set SDXL_COMPILE=1) ;;
    sdxl-worker-fused) cmd=(benchmarks/sdxl_speed.py --only worker --set SDXL_COMPILE=1 --set SDXL_FUSE_QKV=1) ;;
    *) echo "unknown step $name" >> "$RES/progress.log"; return ;;
  esac
  [[ $name == levers-* ]] || cmd+=(--workdir "$W")
  echo "[$(date -u +%T)] start $name: ${cmd[*]}" >> "$RES/progress.log"
  python3 "${cmd[@]}" --out "$out" > "$out/log.txt" 2>&1
  echo "[$(date -u +%T)] end $name rc=$?" >> "$RES/progress.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$RES/gpu.txt" 2>&1
for step in "$@"; do
  run_step "$step"
done
echo "[$(date -u +%T)] all done" >> "$RES/progress.log"
