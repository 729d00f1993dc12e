#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run on one H100/H200 (under 9 minutes: a session has
# 15 minutes of device time in all, ~3 of them to start the machine), results in one folder. Parts, in
# order, each under its own time cap, the caps summing to no more than the total budget (checked at
# start), each fail-soft (a failed or timed-out part, the trainer's build included, is reported and
# the next one runs):
#
#   deps        the carried wheels (.whl/, from bench/gpu_prepare.sh) installed with
#               `pip install --no-index --no-deps --target`, first on PYTHONPATH (skipped when
#               deepspeed, webdataset, jiwer, decord, soundfile and tyro already import)
#   versions    nvidia-smi, torch/triton/deepspeed/transformers versions, nvcc
#   kernel      the CUDA kernel tests: tests/trainer/kernels/test_decorrelation.py (odd-shape grid compiled,
#               fp32 and bf16, larger shapes)
#   models      random-weight model folders at real widths (bench/bench_trainer.py models): a
#               Llama-3.2-1B-shaped LLM, Whisper-medium and AV-HuBERT-Large-shaped encoders
#   zero3       the trainer on 1 GPU, bf16, ZeRO-3 (bench/bench_trainer.py run): samples/s, tokens/s,
#               MFU, peak memory, fixed-batch learning, a profiled step, decorrelation kernel vs
#               reference, sink-monitor probe, checkpoint save + resume, greedy decoding
#   zero2       the same trainer with ZeRO-2: throughput, memory, profiled step
#   decorr      the decorrelation benchmark (L=27, D=3072, B 8/16/32, prefix 100/300/600): Triton
#               kernel and eager, then the block-size sweep (GPU_CHECKS_COMPILE=1: also torch.compile
#               of the reference, ~2 min more: raise GPU_CHECKS_BUDGET_S with it)
#
#   bash bench/gpu_checks.sh [OUT_DIR]            # default: $OUT, else ./gpu_checks
#   bash bench/gpu_checks.sh --dry-run [OUT_DIR]  # CPU: tiny widths, every part and code path
#
# Without a GPU it is a dry run by itself (interpreted kernels, tiny models, bf16 like the GPU run, on
# the CPU: --train.device cpu). Big files (model
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
# Time caps per part in seconds on a GPU (x4 in the dry run: a shared 2-core CPU is slow). Their sum
# must fit the budget, so that every part gets its cap and the last ones are never starved.
compile=${GPU_CHECKS_COMPILE:-0}
declare -A caps=([deps]=40 [versions]=25 [kernel]=90 [models]=60 [zero3]=150 [zero2]=80 [decorr]=60 [sweep]=30)
[ "$compile" = 1 ] && caps[decorr_compile]=120
if [ $dry = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  caps[clips]=120                       # built here in the dry run; a GPU run gets them carried (.gpu_clips)
  unset 'caps[sweep]'                   # the block-size sweep is a GPU measurement only
  scale=4
  budget=${GPU_CHECKS_BUDGET_S:-2600}
  device=cpu
else
  unset TRITON_INTERPRET                # compiled kernels on a GPU (conftest/bench set it without one)
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$work/torch_extensions}   # only if an op is JIT-built
  scale=1
  budget=${GPU_CHECKS_BUDGET_S:-$(( 540 + (compile == 1 ? 120 : 0) ))}   # 9 min (+2 with the compile)
  device=cuda
fi
cap_sum=0
for c in "${caps[@]}"; do cap_sum=$((cap_sum + c * scale)); done
if [ "$cap_sum" -gt "$budget" ]; then
  echo "gpu_checks: the part caps sum to ${cap_sum}s, over the ${budget}s budget: lower a cap or raise" \
       "GPU_CHECKS_BUDGET_S" >&2
  exit 2
fi
start=$SECONDS
status=0
printf 'part\trc\tseconds\n' > "$out/parts.tsv"

# part NAME CMD...: runs CMD under min(its cap, what is left of the budget), output in NAME.log.
part() {
  local name=$1 cap=$(( ${caps[$1]} * scale )); shift
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
  part deps $PY -m pip install -q --no-index --no-deps --target "$deps" .whl/*.whl
  export PYTHONPATH=$deps:$PYTHONPATH PATH=$deps/bin:$PATH
else
  echo "== deps: missing and no .whl/ (run bench/gpu_prepare.sh here first)"; status=1
fi

part versions bash -c "nvidia-smi || true; $PY -m trainer.doctor --out '$out' -- --train.device $device"

# ---- the kernel on CUDA -----------------------------------------------------------------------------
part kernel $PY -m pytest -q -p no:cacheprovider tests/trainer/kernels/test_decorrelation.py

# ---- the trainer at real widths ---------------------------------------------------------------------
clips=.gpu_clips
if [ $dry = 1 ] && [ ! -f "$clips/train.index.json" ]; then
  echo "== no $clips/ (bench/gpu_prepare.sh builds it); building a small set here"
  part clips $PY -m data_tools synth --out "$work/clips" --num 24 --sentences bench/gpu_sentences.txt \
      --val-fraction 0.17 --test-fraction 0.17 --samples-per-shard 4 --quiet
  clips=$work/clips
fi
if [ $dry = 1 ]; then
  size=tiny; run_args=(--warmup 1 --steps 1 --learn-steps 3 --num-workers 1 --decode-clips 2 --max-new-tokens 4)
else
  size=real; run_args=(--warmup 3 --steps 8 --learn-steps 6 --num-workers 4 --decode-clips 4 --max-new-tokens 32)
fi
# bf16 in both: what a GPU run trains with (the dry run checks the same path on the CPU accelerator)
run_args+=(--precision bf16 --device $device)
if [ ! -f "$clips/train.index.json" ]; then
  echo "== no $clips/ on the GPU machine (espeak-ng is not there): run bench/gpu_prepare.sh and carry it;" \
       "trainer parts skipped"; status=1
else
  part models $PY bench/bench_trainer.py models --out "$work/models" --shards "$clips" --size $size --device $device
  part zero3 $PY bench/bench_trainer.py run --models "$work/models" --shards "$clips" --zero 3 \
      --out "$out/trainer_zero3" --run-dir "$work/run_zero3" "${run_args[@]}"
  part zero2 $PY bench/bench_trainer.py run --models "$work/models" --shards "$clips" --zero 2 \
      --out "$out/trainer_zero2" --run-dir "$work/run_zero2" --parts throughput profile "${run_args[@]}"
fi

# ---- the decorrelation benchmark --------------------------------------------------------------------
part decorr $PY bench/bench_decorrelation.py --impls triton eager --csv "$out/decorrelation.csv"
if [ $dry = 0 ]; then
  part sweep $PY bench/bench_decorrelation.py --sweep
  [ "$compile" = 1 ] && part decorr_compile $PY bench/bench_decorrelation.py --impls compile --csv "$out/decorrelation.csv"
fi

# ---- one summary --------------------------------------------------------------------------------------
{
  echo "# GPU checks ($(date -u +%F' '%H:%M' UTC'), $([ $dry = 1 ] && echo 'CPU dry run' || echo GPU), $((SECONDS - start)) s)"
  echo; echo '| part | rc | seconds |'; echo '|---|---|---|'
  tail -n +2 "$out/parts.tsv" | while IFS=$'\t' read -r n r s; do echo "| $n | $r | $s |"; done
  echo; echo '## Environment (python -m trainer.doctor)'; echo '```'; cat "$out"/doctor-*.txt 2>/dev/null; echo '```'
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
