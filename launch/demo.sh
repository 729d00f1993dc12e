#!/usr/bin/env bash
# The main job on a fresh machine: set up, build the synthetic corpus, train the demo
# (launch/recipes/demo.yaml: tiny Llama-AVSR, AVSR mode, ZeRO-3 on 2 processes), report held-out WER.
# Extra arguments go to launch/train.py (e.g. --model.modality asr --train.max-steps 100).
set -euo pipefail
export AVSR_SETUP_APT=${AVSR_SETUP_APT:-1}   # ffmpeg and espeak-ng: the synthetic corpus needs them
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
if command -v nvidia-smi >/dev/null 2>&1; then
  NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
[ -f data/synth/test.index.json ] || python -m data_tools synth --out data/synth --num 2000 --seed 0
deepspeed --num_gpus "$NPROC" launch/train.py --config ds_configs/zero3.json --recipe launch/recipes/demo.yaml "$@"
