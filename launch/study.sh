#!/usr/bin/env bash
# The attention-sink study (issue 22): does the decorrelation loss remove intermediate sinks and what does it do
# to recognition, in the paper's ASR setting (audio rate 32, average pooling, launch/recipes/mini_study.yaml) on
# the mini real-parts Llama-AVSR. Every run shares one corpus and differs from its comparison run in one thing:
#
#   base_s1         baseline: pre-fusion LayerNorm, lambda 0, seed 1 (model init and data order)
#   base_s2         the same, seed 2: the seed-to-seed spread every effect is read against
#   noln_s1         base_s1 without the pre-fusion LayerNorm: what the LayerNorm alone does
#   dec1e4_s1       base_s1 + the paper's lambda 1e4
#   decmatch_s1     base_s1 + lambda "match": CE / L_dec of base_s1's first step, so that lambda * L_dec ~ CE at the start
#   dec1e4ramp_s1   base_s1 + lambda 1e4 reached by a linear ramp over the first half of training
#
# Each run: sink monitor at step 0 and at the end on 32 validation clips; the validation loss (teacher-forced,
# 40 utterances) every 10 steps; CE and lambda*L_dec gradient norms at step 1 and every 10 steps; at the end
# greedy WER and the teacher-forced loss per token on 160 test utterances (sentences not in train). Then
# launch/study_report.py writes runs/study/report.md, figures and summary.json (WER with 95 % bootstrap intervals
# over utterances, paired differences to the comparison run: trainer/stats.py) and logs them to MLflow as a
# parent run with the training runs as its children (runs/study/mlflow.db).
#
#   bash launch/study.sh                      # defaults: STEPS=100, 31.6 min on 2 idle CPU cores (2026-12-07; docs/monitoring.md, "The study")
#   STEPS=2 RUNS="base_s1:1:ln:0 dec1e4_s1:1:ln:1e4" STUDY_DIR=runs/study_smoke bash launch/study.sh   # plumbing check
#   RUNS="dec100_s1:1:ln:100" STUDY_DIR=runs/study_l100 bash launch/study.sh                            # other arms
#   mlflow ui --backend-store-uri sqlite:///runs/study/mlflow.db --port 5001
#
# RUNS: name:seed:ln|noln:lambda[:ramp], lambda a number or "match" (computed from the first run, which must have
# lambda 0), ramp the number of ramp steps or "ramp" for STEPS/2. Needs the converted models (python -m data_tools
# pretrained --out models/, run here when missing) and builds its corpus on first use (CORPUS, 1000 utterances:
# 800 train / 40 val / 160 test, every sentence spoken once, so test sentences are not in train). On CPU one
# process (ZeRO-2, 2 threads; 2 processes need ~2 x 2.7 GB and were OOM-killed on a shared 24 GB machine);
# PORT fixes the launcher's port (default: a free one). Extra arguments go to every train.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."        # relative paths are the checkout's (setup_env.sh changes into it too)
STUDY_DIR=${STUDY_DIR:-runs/study}
STEPS=${STEPS:-100}
CORPUS=${CORPUS:-data/synth_study}
MODELS=${MODELS:-models}
RECIPE=${RECIPE:-launch/recipes/mini_study.yaml}
# ZeRO-2: one CPU process holds the 135M model whole either way, and the CE / lambda*L_dec gradient norms
# (autograd.grad) cannot reach ZeRO-3's partitioned parameters
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
RUNS=${RUNS:-base_s1:1:ln:0 base_s2:2:ln:0 noln_s1:1:noln:0 dec1e4_s1:1:ln:1e4 decmatch_s1:1:ln:match dec1e4ramp_s1:1:ln:1e4:ramp}
# The parameters, checked before anything is installed, built or written: one line and exit 2 each.
bad() { echo "error: $*" >&2; exit 2; }
whole='^[1-9][0-9]*$'
number='^[0-9]+([.][0-9]*)?([eE][-+]?[0-9]+)?$'
[[ $STEPS =~ $whole ]] || bad "STEPS=$STEPS: a whole number of steps >= 1 is accepted"
[ -z "${NPROC:-}" ] || [[ $NPROC =~ $whole ]] || bad "NPROC=$NPROC: a whole number of processes >= 1 is accepted"
[ -z "${PORT:-}" ] || [[ $PORT =~ $whole ]] || bad "PORT=$PORT: a port number is accepted"
[ -f "$RECIPE" ] || bad "RECIPE=$RECIPE: no such recipe"
[ -f "$DS_CONFIG" ] || bad "DS_CONFIG=$DS_CONFIG: no such DeepSpeed JSON"
[ -e "$STUDY_DIR" ] && bad "STUDY_DIR=$STUDY_DIR exists: remove it or set STUDY_DIR to a new folder"
first=1
for spec in $RUNS; do
  IFS=: read -r name seed ln lambda ramp extra <<< "$spec"
  [[ -n $name && -z ${extra:-} && $seed =~ ^[0-9]+$ && ( $ln == ln || $ln == noln ) && -n ${lambda:-} ]] \
    || bad "RUNS: $spec: name:seed:ln|noln:lambda[:ramp] is accepted"
  [[ $lambda =~ $number || ( $lambda == match && $first == 0 ) ]] \
    || bad "RUNS: $spec: lambda $lambda: a number >= 0, or \"match\" after a first run with lambda 0"
  [[ -z ${ramp:-} || $ramp == ramp || $ramp =~ $whole ]] || bad "RUNS: $spec: ramp $ramp: \"ramp\" or a number of steps"
  if [ $first = 1 ]; then first=0; ref_lambda=$lambda; fi
done
[[ $RUNS != *:match* || $ref_lambda =~ ^0+([.]0*)?$ ]] || bad "RUNS: lambda \"match\" needs a first run with lambda 0"
export AVSR_SETUP_APT=${AVSR_SETUP_APT:-1}   # ffmpeg and espeak-ng: the synthetic corpus needs them
source launch/setup_env.sh
if command -v nvidia-smi >/dev/null 2>&1; then NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}; else
  NPROC=${NPROC:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
t0=$(date +%s)
pid=""
stop_run() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi; }   # never fails: keeps the exit status
trap stop_run INT TERM EXIT                       # a stopped study stops its run
say() { echo "[study $(( $(date +%s) - t0 ))s] $*"; }

python -m data_tools pretrained --out "$MODELS"
[ -f "$CORPUS/test.index.json" ] || { say "building $CORPUS"; python -m data_tools synth --out "$CORPUS" \
  --num 1000 --seed 0 --val-fraction 0.04 --test-fraction 0.16 --quiet; }
mkdir -p "$STUDY_DIR"
export MLFLOW_TRACKING_URI="sqlite:///$(cd "$STUDY_DIR" && pwd)/mlflow.db" MLFLOW_EXPERIMENT_NAME=mini_study
unset MLFLOW_RUN_ID
python launch/study_report.py --study-dir "$STUDY_DIR" --init      # the experiment, artefacts inside STUDY_DIR

# lambda such that lambda * L_dec = CE at step 1 of the first run (its log line "step 1/N loss L ce C dec D ...";
# a lambda-0 run still measures L_dec), rounded to two significant digits
matched_lambda() {
  python - "$1" <<'PY'
import re, sys
m = re.search(r"step 1/\d+ loss \S+ ce (\S+) dec (\S+)", open(sys.argv[1]).read())
if not m:
    sys.exit(f"no 'step 1/N ... ce C dec D' line in {sys.argv[1]}: cannot match lambda")
ce, dec = float(m.group(1)), float(m.group(2))
print(f"{ce / dec:.2g}")
PY
}

read -r -a runs <<< "$RUNS"
names=()
i=0
for spec in "${runs[@]}"; do
  IFS=: read -r name seed ln lambda ramp <<< "$spec"
  names+=("$name")
  if [ "$lambda" = match ]; then
    lambda=$(matched_lambda "$STUDY_DIR/${names[0]}.log")
    say "lambda match: CE / L_dec at step 1 of ${names[0]} = $lambda"
  fi
  case "${ramp:-}" in "") ramp=0 ;; ramp) ramp=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 )) ;; esac
  i=$((i + 1))
  say "run $i/${#runs[@]}: $name (seed $seed, pre-fusion LayerNorm: $ln, lambda $lambda, ramp $ramp steps, $STEPS steps)"
  port=${PORT:-$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
  : > "$STUDY_DIR/$name.log"                        # exists before tail follows it
  deepspeed --num_gpus "$NPROC" --master_port "$port" launch/train.py --config "$DS_CONFIG" \
    --recipe "$RECIPE" --train.run-dir "$STUDY_DIR/$name" --tracking.run-name "$name" \
    --tracking.experiment mini_study --data.shard-dir "$CORPUS" --model.llm-path "$MODELS/SmolLM2-135M-Instruct" \
    --model.whisper-path "$MODELS/whisper-tiny.en" --train.seed "$seed" --data.seed "$seed" \
    --model.prefusion-layernorm "$([ "$ln" = ln ] && echo True || echo False)" \
    --model.decorrelation-weight "$lambda" --model.decorrelation-warmup-steps "$ramp" \
    --train.max-steps "$STEPS" --monitor.every "$STEPS" \
    --train.warmup-steps $(( STEPS / 6 > 1 ? STEPS / 6 : 1 )) "$@" > "$STUDY_DIR/$name.log" 2>&1 &
  pid=$!
  tail -n +1 -f "$STUDY_DIR/$name.log" --pid $pid | grep --line-buffered -E "step [0-9]+/[0-9]+ |WER|loss per token|Error|Traceback" || true
  wait $pid || { echo "run $name failed: see $STUDY_DIR/$name.log" >&2; exit 1; }
  say "run $i done"
done
say "writing the report"
python launch/study_report.py --study-dir "$STUDY_DIR" --runs "${names[@]}" \
  --wall-s $(( $(date +%s) - t0 ))
say "done: $STUDY_DIR/report.md"
