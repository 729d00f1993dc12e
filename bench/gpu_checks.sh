#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run on one H100/H200 (under ~8 minutes), results in
# one folder. Parts, in order, each under its own time cap and all under a total budget, each
# fail-soft (a failed or timed-out part is reported and the next one runs):
#
#   deps        the carried wheels (.whl/, from bench/gpu_prepare.sh) installed with
#               `pip install --no-index --no-deps --target`, first on PYTHONPATH (skipped when
#               deepspeed, webdataset, jiwer, decord, soundfile and tyro already import)
#   versions    nvidia-smi, torch/triton/deepspeed/transformers versions, nvcc
#   kernel      the CUDA kernel tests: tests/test_decorrelation_kernel.py (odd-shape grid compiled,
#               fp32 and bf16, larger shapes)
#   models      random-weight model folders at real widths (bench/bench_trainer.py models): a
#               Llama-3.2-1B-shaped LLM, Whisper-medium and AV-HuBERT-Large-shaped encoders
#   zero3       the trainer on 1 GPU, bf16, ZeRO-3 (bench/bench_trainer.py run): samples/s, tokens/s,
#               MFU, peak memory, fixed-batch learning, a profiled step, decorrelation kernel vs
#               reference, sink-monitor probe, checkpoint save + resume, greedy decoding
#   zero2       the same trainer with ZeRO-2: throughput, memory, profiled step
#   decorr      the decorrelation benchmark (L=27, D=3072, B 8/16/32, prefix 100/300/600): Triton
#               kernel and eager, then torch.compile of the reference, then the block-size sweep
#
#   bash bench/gpu_checks.sh [OUT_DIR]            # default: $OUT, else ./gpu_checks
#   bash bench/gpu_checks.sh --dry-run [OUT_DIR]  # CPU: tiny widths, every part and code path
#
# Without a GPU it is a dry run by itself (interpreted kernels, tiny models, fp32). Big files (model
# folders, checkpoints) go to $GPU_CHECKS_WORK (default a temp folder), never to OUT_DIR.
# OUT_DIR/SUMMARY.md collects every part's result; OUT_DIR/parts.tsv has rc and seconds per part.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-gpu_checks}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=${GPU_CHECKS_WORK:-$(mktemp -d /tmp/gpu_checks_work.XXXXXX)}
mkdir -p "$work"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ $dry = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  dry=1
fi
if [ $dry = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  budget=${GPU_CHECKS_BUDGET_S:-2400}   # a shared 2-core CPU is slow: caps x4; the GPU budget is below
  scale=4
else
  unset TRITON_INTERPRET                # compiled kernels on a GPU (conftest/bench set it without one)
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$work/torch_extensions}   # fused Adam JIT-built once
  budget=${GPU_CHECKS_BUDGET_S:-470}    # ends under 8 minutes
  scale=1
fi
start=$SECONDS
status=0
printf 'part\trc\tseconds\n' > "$out/parts.tsv"

# part NAME CAP_S CMD...: runs CMD under min(CAP_S, what is left of the budget), output in NAME.log.
part() {
  local name=$1 cap=$(($2 * scale)); shift 2
  local left=$((budget - (SECONDS - start)))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped (budget spent)"; printf '%s\tskipped\t0\n' "$name" >> "$out/parts.tsv"; status=1; return
  fi
  echo "== $name (cap ${limit}s)"
  local t0=$SECONDS rc
  timeout -k 15 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$out/parts.tsv"
  tail -n 25 "$out/$name.log"
  [ $rc = 0 ] || { echo "== $name: rc $rc (124 = time cap)"; status=1; }
}

# ---- deps: the carried wheels -----------------------------------------------------------------------
if $PY -c "import deepspeed, webdataset, jiwer, decord, soundfile, tyro" 2>/dev/null; then
  echo "== deps: already importable" | tee "$out/deps.log"
elif [ -d .whl ]; then
  deps=$work/site
  part deps 90 $PY -m pip install -q --no-index --no-deps --target "$deps" .whl/*.whl
  export PYTHONPATH=$deps:$PYTHONPATH PATH=$deps/bin:$PATH
else
  echo "== deps: missing and no .whl/ (run bench/gpu_prepare.sh here first)"; status=1
fi

part versions 60 bash -c "nvidia-smi || true; command -v nvcc && nvcc --version | tail -2 || echo 'nvcc: none'
  $PY -c 'import sys, torch, triton, transformers, peft, deepspeed; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__, \"deepspeed\", deepspeed.__version__)'"

# ---- the kernel on CUDA -----------------------------------------------------------------------------
part kernel 120 $PY -m pytest -q -p no:cacheprovider tests/test_decorrelation_kernel.py

# ---- the trainer at real widths ---------------------------------------------------------------------
clips=.gpu_clips
if [ ! -f "$clips/train.index.json" ]; then
  echo "== no $clips/ (bench/gpu_prepare.sh builds it); building a small set here"
  part clips 120 $PY -m data_tools synth --out "$work/clips" --num 24 --sentences bench/gpu_sentences.txt \
      --val-fraction 0.17 --test-fraction 0.17 --samples-per-shard 4 --quiet
  clips=$work/clips
fi
if [ $dry = 1 ]; then
  size=tiny; run_args=(--warmup 1 --steps 1 --learn-steps 3 --num-workers 1 --decode-clips 2 --max-new-tokens 4)
else
  size=real; run_args=(--warmup 3 --steps 8 --learn-steps 6 --num-workers 4 --decode-clips 4 --max-new-tokens 32)
fi
part models 120 $PY bench/bench_trainer.py models --out "$work/models" --shards "$clips" --size $size
part zero3 200 $PY bench/bench_trainer.py run --models "$work/models" --shards "$clips" --zero 3 \
    --out "$out/trainer_zero3" --run-dir "$work/run_zero3" "${run_args[@]}"
part zero2 110 $PY bench/bench_trainer.py run --models "$work/models" --shards "$clips" --zero 2 \
    --out "$out/trainer_zero2" --run-dir "$work/run_zero2" --parts throughput profile "${run_args[@]}"

# ---- the decorrelation benchmark --------------------------------------------------------------------
part decorr 100 $PY bench/bench_decorrelation.py --impls triton eager --csv "$out/decorrelation.csv"
if [ $dry = 0 ]; then
  part decorr_compile 120 $PY bench/bench_decorrelation.py --impls compile --csv "$out/decorrelation.csv"
  part sweep 45 $PY bench/bench_decorrelation.py --sweep
fi

# ---- one summary --------------------------------------------------------------------------------------
{
  echo "# GPU checks ($(date -u +%F' '%H:%M' UTC'), $([ $dry = 1 ] && echo 'CPU dry run' || echo GPU), $((SECONDS - start)) s)"
  echo; echo '| part | rc | seconds |'; echo '|---|---|---|'
  tail -n +2 "$out/parts.tsv" | while IFS=$'\t' read -r n r s; do echo "| $n | $r | $s |"; done
  echo; echo '## Versions'; echo '```'; tail -n 3 "$out/versions.log" 2>/dev/null; echo '```'
  echo; echo '## Kernel tests'; echo '```'; tail -n 3 "$out/kernel.log" 2>/dev/null; echo '```'
  for z in 3 2; do
    [ -f "$out/trainer_zero$z/summary.md" ] && { echo; cat "$out/trainer_zero$z/summary.md"; }
  done
  echo; echo '## Decorrelation benchmark'; echo '```'
  grep -v '^\s*$' "$out/decorr.log" 2>/dev/null | tail -n 40
  grep -v '^\s*$' "$out/decorr_compile.log" 2>/dev/null | tail -n 20
  grep -v '^\s*$' "$out/sweep.log" 2>/dev/null | tail -n 12
  echo '```'
} > "$out/SUMMARY.md"
echo "gpu_checks: status $status after $((SECONDS - start)) s; results in $out (SUMMARY.md); scratch in $work"
[ -n "${GPU_CHECKS_WORK:-}" ] || rm -rf "$work"
exit $status
