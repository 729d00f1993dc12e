#!/usr/bin/env bash
# The attention-sink study on the mini real-parts Llama-AVSR (launch/recipes/mini_avsr*.yaml):
# baseline vs decorrelation loss (lambda 1e4 + pre-fusion LayerNorm), each at a high compression rate
# (audio 16, video 5: the paper's headline setting) and a low one (audio 4, video 2), sink monitor on
# at step 0 and at the end. Writes runs/study/report.md + figures, logged to MLflow as a parent run
# with the four training runs as its children (runs/study/mlflow.db).
#
#   bash launch/study.sh                    # defaults: STEPS=120 (31 min on 2 CPU cores); on CPU NPROC=1 (ZeRO-3, 1 process, 2 threads:
#                                           #   2 processes need ~2 x 2.7 GB and were OOM-killed on a shared 24 GB machine)
#   STEPS=8 STUDY_DIR=runs/study_quick bash launch/study.sh      # the sink picture only (~10 min), no recognition yet
#   RUNS="decorr_high_lambda100:mini_avsr_decorr:16:5:100" STUDY_DIR=runs/study_l100 bash launch/study.sh
#   mlflow ui --backend-store-uri sqlite:///runs/study/mlflow.db --port 5001
#
# Needs the converted models (python -m data_tools pretrained --out models/, run here when missing) and
# builds its corpus (data/synth_study: 300 utterances, 279 train / 9 val / 12 test: evaluation, greedy
# decoding with a 135M LLM, is most of a run's time on CPU) on first use. Extra arguments go to train.py.
set -euo pipefail
STUDY_DIR=${STUDY_DIR:-runs/study}
STEPS=${STEPS:-120}
CORPUS=${CORPUS:-data/synth_study}
MODELS=${MODELS:-models}
ORDER=${ORDER:-"audio video"}          # the paper's order; ORDER="video audio" puts video first
RUNS=${RUNS:-baseline_high:mini_avsr:16:5 decorr_high:mini_avsr_decorr:16:5 baseline_low:mini_avsr:4:2 decorr_low:mini_avsr_decorr:4:2}
# The parameters, checked before anything is installed, built or written: one line and exit 2 each.
bad() { echo "error: $*" >&2; exit 2; }
whole='^[1-9][0-9]*$'
[[ $STEPS =~ $whole ]] || bad "STEPS=$STEPS: a whole number of steps >= 1 is accepted"
[ -z "${NPROC:-}" ] || [[ $NPROC =~ $whole ]] || bad "NPROC=$NPROC: a whole number of processes >= 1 is accepted"
case "$ORDER" in "audio video"|"video audio") ;; *) bad "ORDER=$ORDER: \"audio video\" or \"video audio\" is accepted";; esac
[ -e "$STUDY_DIR" ] && bad "STUDY_DIR=$STUDY_DIR exists: remove it or set STUDY_DIR to a new folder"
for spec in $RUNS; do
  IFS=: read -r name recipe arate vrate lambda extra <<< "$spec"
  [[ -n $name && -z ${extra:-} && $arate =~ $whole && $vrate =~ $whole ]] || bad "RUNS: $spec: name:recipe:audio_rate:video_rate[:lambda] is accepted (rates whole numbers >= 1)"
  [ -f "$(dirname "${BASH_SOURCE[0]}")/recipes/$recipe.yaml" ] || bad "RUNS: $spec: no recipe launch/recipes/$recipe.yaml"
  [[ -z ${lambda:-} || $lambda =~ ^[0-9]+([.][0-9]*)?([eE][-+]?[0-9]+)?$ ]] || bad "RUNS: $spec: lambda $lambda: a number >= 0 is accepted"
done
export AVSR_SETUP_APT=${AVSR_SETUP_APT:-1}   # ffmpeg and espeak-ng: the synthetic corpus needs them
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
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
  --num 300 --seed 0 --val-fraction 0.03 --test-fraction 0.04 --quiet; }
mkdir -p "$STUDY_DIR"
export MLFLOW_TRACKING_URI="sqlite:///$(cd "$STUDY_DIR" && pwd)/mlflow.db" MLFLOW_EXPERIMENT_NAME=mini_study
unset MLFLOW_RUN_ID
python launch/study_report.py --study-dir "$STUDY_DIR" --init      # the experiment, artefacts inside STUDY_DIR

# name:recipe:audio_rate:video_rate[:lambda]; RUNS="..." replaces the list (lambda: the recipe's if left out)
read -r -a runs <<< "$RUNS"
names=()
i=0
for spec in "${runs[@]}"; do
  IFS=: read -r name recipe arate vrate lambda <<< "$spec"
  names+=("$name")
  extra=()
  [ -n "${lambda:-}" ] && extra=(--model.decorrelation-weight "$lambda")
  i=$((i + 1))
  say "run $i/${#runs[@]}: $name ($recipe, audio rate $arate, video rate $vrate, order: $ORDER, $STEPS steps)"
  port=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
: > "$STUDY_DIR/$name.log"                        # exists before tail follows it
  deepspeed --num_gpus "$NPROC" --master_port "$port" launch/train.py --config ds_configs/zero3.json \
    --recipe "launch/recipes/$recipe.yaml" --train.run-dir "$STUDY_DIR/$name" --tracking.run-name "$name" \
    --tracking.experiment mini_study --data.shard-dir "$CORPUS" --model.llm-path "$MODELS/SmolLM2-135M-Instruct" \
    --model.whisper-path "$MODELS/whisper-tiny.en" --model.audio-rate "$arate" --model.video-rate "$vrate" \
    --model.modality-order $ORDER --train.max-steps "$STEPS" --monitor.every "$STEPS" \
    --train.warmup-steps $(( STEPS / 6 > 1 ? STEPS / 6 : 1 )) "${extra[@]}" "$@" > "$STUDY_DIR/$name.log" 2>&1 &
  pid=$!
  tail -n +1 -f "$STUDY_DIR/$name.log" --pid $pid | grep --line-buffered -E "step [0-9]+/[0-9]+ |WER|Error|Traceback" || true
  wait $pid || { echo "run $name failed: see $STUDY_DIR/$name.log" >&2; exit 1; }
  say "run $i done"
done
say "writing the report"
python launch/study_report.py --study-dir "$STUDY_DIR" --runs "${names[@]}" \
  --wall-s $(( $(date +%s) - t0 ))
say "done: $STUDY_DIR/report.md"
