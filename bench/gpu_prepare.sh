#!/usr/bin/env bash
# Everything bench/gpu_checks.sh needs on the lent GPU machine beyond the working tree, built here
# (needs this project's environment: espeak-ng, ffmpeg, the venv), into git-ignored folders:
#   .whl/         the wheels (bench/gpu_wheels.sh)
#   .gpu_clips/   96 synthetic clips (espeak-ng speech + mouth video, the 24 LRS3-like sentences of
#                 bench/gpu_sentences.txt by 4 voices, 2-10 s): train 64 in 8 shards, val 16, test 16
#                 (~20 MiB): ~5 frame-budget batches per epoch, enough for a throughput figure (24
#                 clips made one and a half batches, so 8 timed steps re-ran the same two)
# and checks that working tree + both stay under the device tool's 64 MiB.
#
#   bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
bash bench/gpu_wheels.sh .whl
"$PY" -m data_tools synth --out .gpu_clips --num 96 --seed 0 --sentences bench/gpu_sentences.txt \
    --val-fraction 0.17 --test-fraction 0.17 --samples-per-shard 8 --overwrite --quiet
# What the device tool carries: tracked + untracked-not-ignored files, plus the carried folders.
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
whl=$(du -sb .whl | cut -f1)
clips=$(du -sb .gpu_clips | cut -f1)
total=$((tree + whl + clips))
printf 'carried: working tree %.1f MiB + .whl %.1f MiB + .gpu_clips %.1f MiB = %.1f MiB (limit 64)\n' \
    "$(echo "$tree / 1048576" | bc -l)" "$(echo "$whl / 1048576" | bc -l)" \
    "$(echo "$clips / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over the 64 MiB the device tool carries" >&2; exit 1; }
