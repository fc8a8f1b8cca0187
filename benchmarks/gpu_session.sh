#!/usr/bin/env bash
# The benchmark on the lent GPU machine, run in the background so that device calls only poll.
#
#   bash benchmarks/gpu_session.sh start STEP...   # install the carried wheels, then in the background (setsid):
#                                                  # build the full-size random models, run each STEP
#   bash benchmarks/gpu_session.sh poll            # RES -> $OUT/res.tgz; progress and the latest log lines
#
# Steps (each writes RES/<step>/: its JSON and log.txt; RES/progress.log says what started and ended):
#   attention    attention.py: float8 attention against SDPA at 32,760 tokens (ms, error)
#   vae          vae.py: the Wan VAE's encode/decode in bf16 as diffusers runs it and as the worker does
#   vae-float32  the same in float32 (the model card's VAE dtype)
#   encode       encode.py: PNG and MP4 encoding on this host's CPU, and the PNG goals-sdxl's job made
#   goals        bench.py --full (40 steps) with the speed switches: video81, forward, fast
#   goals-fast   the same, the fast preset alone
#   goals-sdxl   the same for SDXL's default job (image); builds the SDXL models if missing
#   quick        bench.py, default settings, 2 video steps, every job
#   quick-speed  the same with the speed switches
#   cold         cold_start.py: 2 shapes x default, speed-empty, speed-cached, plain
#   cold-cached  cold_start.py at 480x832x81: default, speed-cached (the cache `goals` left), plain
#   cold16       cold_start.py, 3 steps, 2 shapes x default, speed-empty, speed-cached (the cold-start table)
#   cold-goals   cold_start.py at 480x832x81: default, speed-empty, speed-cached, plain (issue 22's three goals),
#                after the disk's speed on 16 GB of the Wan files (one stream against the worker's read-ahead)
#   cold-worker  cold-goals' worker starts alone (disk probe on 8 GB); cold-plain: its plain diffusers start alone
#   cold1024     cold_start.py at 1024x768x33, default and speed-cached, REPEAT (3) starts of each (the segfault)
#   fp8-compile  fp8_compile.py: one full-size Wan block compiled cold and cached, torchao float8 against the
#                worker's float8 layers (scaled_mm), with and without torch's precompile
#   report       goals.json from goals (+ goals-sdxl) + cold (or cold-cached), into RES/
set -u
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
RES=${RES:-/tmp/res}
MODELS=${MODELS:-/tmp/bench-models}
CACHE=${CACHE:-/tmp/compile-cache}
SPEED=(--set WAN_FP8=1 --set WAN_FP8_ATTENTION=1 --set WAN_COMPILE=1 --set WAN_VAE_DTYPE=bfloat16 --set SDXL_COMPILE=1
       --set "COMPILE_CACHE_DIR=$CACHE")
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1

run_step() {
  local name=$1 out="$RES/$1" cmd
  mkdir -p "$out"
  case $name in
    build) cmd=(download_weights.py --random-full "$MODELS" ${ONLY:+--only "$ONLY"} --fp8) ;;
    attention) cmd=(benchmarks/attention.py --out "$out/attention.json") ;;
    vae) cmd=(benchmarks/vae.py --out "$out/vae.json") ;;
    vae-float32) cmd=(benchmarks/vae.py --dtype float32 --out "$out/vae-float32.json") ;;
    encode) cmd=(benchmarks/encode.py --out "$out/encode.json")
            [[ -f $RES/goals-sdxl/image-sdxl.png ]] && cmd+=(--image "$RES/goals-sdxl/image-sdxl.png") ;;
    goals) cmd=(benchmarks/bench.py --full --only video81,forward,fast "${SPEED[@]}" --models "$MODELS") ;;
    goals-fast) cmd=(benchmarks/bench.py --full --only fast --tag fast "${SPEED[@]}" --models "$MODELS") ;;
    goals-sdxl) cmd=(benchmarks/bench.py --full --only image --tag sdxl "${SPEED[@]}" --models "$MODELS") ;;
    quick) cmd=(benchmarks/bench.py --models "$MODELS") ;;
    quick-speed) cmd=(benchmarks/bench.py "${SPEED[@]}" --models "$MODELS") ;;
    cold) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE") ;;
    cold-cached) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE" --shapes 832x480x81
                      --configs default,speed-cached,plain) ;;
    cold-goals) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE" --shapes 832x480x81
                     --configs default,speed-empty,speed-cached,plain --disk 16) ;;
    cold-worker) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE" --shapes 832x480x81
                      --configs default,speed-empty,speed-cached --disk 8) ;;
    cold-plain) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE" --shapes 832x480x81
                     --configs plain) ;;
    cold1024) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE" --shapes 1024x768x33
                   --configs default,speed-cached --repeat "${REPEAT:-3}") ;;
    fp8-compile) cmd=(benchmarks/fp8_compile.py --out "$out/fp8-compile.json"
                      --lanes "torchao,scaled_mm,scaled_mm+precompile") ;;
    cold16) cmd=(benchmarks/cold_start.py --models "$MODELS" --cache-dir "$CACHE" --steps 3
                 --shapes 832x480x81,1024x768x33 --configs default,speed-empty,speed-cached) ;;
    report)
      cmd=(benchmarks/bench.py --goals)
      for f in "$RES/goals/bench-full.json" "$RES/goals-fast/bench-fast.json" "$RES/goals-sdxl/bench-sdxl.json"; do
        [[ -f $f ]] && cmd+=(--from "$f")
      done
      [[ ${#cmd[@]} -gt 2 ]] || { echo "report: no goals results in $RES" >> "$RES/progress.log"; return; }
      for f in "$RES/cold-cached/cold_start.json" "$RES/cold/cold_start.json"; do  # not cold16: no plain run
        [[ -f $f ]] && { cmd+=(--cold-start "$f"); break; }
      done ;;
    *) echo "unknown step $name" >> "$RES/progress.log"; return ;;
  esac
  [[ $name == build || $name == attention || $name == vae* || $name == encode || $name == fp8-compile ]] || cmd+=(--out "$([[ $name == report ]] && echo "$RES" || echo "$out")")
  echo "[$(date -u +%T)] start $name: ${cmd[*]}" >> "$RES/progress.log"
  python3 "${cmd[@]}" > "$out/log.txt" 2>&1
  local rc=$?
  echo "[$(date -u +%T)] end $name rc=$rc" >> "$RES/progress.log"
}

# The wheels come in two carries (one call may carry 64 MiB): .whl at `start`, .whl-ffmpeg with the next poll.
install() {
  [[ -d $1 && ! -e /tmp/site/$1.done ]] || return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl \
    && touch "/tmp/site/$1.done"
}

case ${1:-} in
  start)
    shift
    install .whl && install .whl-ffmpeg || exit 1
    mkdir -p "$RES"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RES/gpu.txt" 2>&1
    steps=("$@")
    [[ " $* " == *" build "* ]] || steps=(build "$@")  # build first unless placed (after a quick step, say)
    (setsid nohup bash "$SELF" run "${steps[@]}" > "$RES/session.log" 2>&1 &)
    echo "started: ${steps[*]}; poll with: bash benchmarks/gpu_session.sh poll" ;;
  run)
    shift
    for step in "$@"; do
      # The other steps import video_utils: wait (10 min at most) for imageio-ffmpeg, which a poll brings.
      if [[ $step != build && $step != attention && $step != fp8-compile ]]; then
        for _ in $(seq 120); do [[ -e /tmp/site/.whl-ffmpeg.done ]] && break; sleep 5; done
      fi
      run_step "$step"
      # A float8 attention kernel that fails alone must not cost the goals run: they go on without it.
      if [[ $step == attention && ! -s $RES/attention/attention.json ]]; then
        SPEED=("${SPEED[@]/WAN_FP8_ATTENTION=1/WAN_FP8_ATTENTION=0}")
        echo "[$(date -u +%T)] attention failed: WAN_FP8_ATTENTION=0 from here" >> "$RES/progress.log"
      fi
    done
    echo "[$(date -u +%T)] all done" >> "$RES/progress.log" ;;
  poll)
    install .whl-ffmpeg
    [[ -d $RES ]] || { echo "no $RES on this machine (a fresh one?): start again"; exit 1; }
    tar czf "${OUT:-/tmp}/res.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
    cat "$RES/progress.log"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    latest=$(ls -t "$RES"/*/log.txt 2>/dev/null | head -1)
    if [[ -n $latest ]]; then echo "--- $latest"; tail -n 8 "$latest" | cut -c1-400; fi ;;
  *) sed -n 2,17p "$SELF"; exit 2 ;;
esac
