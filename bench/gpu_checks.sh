#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run (a few minutes on an H100/H200): the kernel
# tests on CUDA (the same grid as on CPU, compiled, plus larger shapes), the decorrelation benchmark
# at Llama-3.2-3B sizes (eager, torch.compile, Triton; speed, peak memory, fraction of bandwidth)
# and the block-size sweep. Needs only torch, triton and pytest: the kernels import nothing else.
#
#   bash bench/gpu_checks.sh [OUT_DIR]        # default: $OUT, else ./gpu_checks
#
# Without a GPU it still runs (interpreter tests, the benchmark's smoke path): a dry run of itself.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu_checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET                      # compiled kernels on a GPU (conftest/bench set it without one)
PY=${PYTHON:-python3}
status=0
{ nvidia-smi || true; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$out/versions.txt" 2>&1
$PY -m pytest -q -p no:cacheprovider tests/test_decorrelation_kernel.py 2>&1 | tee "$out/kernel_tests.log" || status=1
$PY bench/bench_decorrelation.py --csv "$out/decorrelation.csv" 2>&1 | tee "$out/bench_decorrelation.log" || status=1
$PY bench/bench_decorrelation.py --sweep 2>&1 | tee "$out/sweep.log" || status=1
echo "gpu_checks: status $status, files in $out"
exit $status
