#!/usr/bin/env bash
# bf16 against fp32: the same training step (bench/profile_step.py: the real Trainer, ZeRO-3, 2 processes)
# in both precisions, interleaved REPEAT times so that a change of machine load hits both alike. Prints
# the mean seconds per step of each and their ratio; rows go to $CSV. Extra arguments go to the
# experiment config (default: the demo model on the demo corpus, built on first use).
#
#   bash bench/bench_precision.sh                       # REPEAT=2 STEPS=15
#   REPEAT=3 bash bench/bench_precision.sh --data.shard-dir data/synth
#
# On a GPU machine the same script compares bf16 with fp32 there (torchrun picks the GPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/setup_env.sh
REPEAT=${REPEAT:-2}
STEPS=${STEPS:-15}
NPROC=${NPROC:-2}
PORT=${PORT:-29571}
CSV=${CSV:-$(mktemp -d)/precision.csv}
echo "[bench] $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) on $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$REPEAT"); do
  for precision in fp32 bf16; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
      --master_port "$PORT" bench/profile_step.py --steps "$STEPS" --warmup 3 --label "$precision" --csv "$CSV" \
      -- --train.precision "$precision" "$@" | grep -E "^(wall|$precision:)"
  done
done
echo "[bench] load after: $(cut -d' ' -f1-3 /proc/loadavg)"
python - "$CSV" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
mean = {p: statistics.mean(float(r["s_per_step"]) for r in rows if r["label"] == p) for p in ("fp32", "bf16")}
runs = {p: [float(r["s_per_step"]) for r in rows if r["label"] == p] for p in mean}
print(f"s/step fp32 {mean['fp32']:.3f} {runs['fp32']}  bf16 {mean['bf16']:.3f} {runs['bf16']}  "
      f"bf16/fp32 = {mean['bf16'] / mean['fp32']:.2f}x")
print(f"rows: {sys.argv[1]}")
PY
