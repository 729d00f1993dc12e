#!/usr/bin/env bash
# Wheels the trainer needs on the lent GPU machine (CPython 3.12, manylinux x86-64), which has torch,
# triton, transformers, peft, accelerate, safetensors, numpy, matplotlib, pytest, tqdm and pyyaml
# but no registry. Downloaded (binary wheels, no dependency resolution: the list below IS the closure
# of `import deepspeed` and the trainer beyond what that machine has) into .whl/ (git-ignored), plus
# DeepSpeed built here from its source distribution with no op prebuilt (DS_BUILD_OPS=0: its ops
# compile just in time there, with that machine's nvcc, if one is needed at all).
# bench/gpu_checks.sh installs them with `pip install --no-index --no-deps --target`.
#
#   bash bench/gpu_wheels.sh [DEST]          # default: .whl/ in the checkout; ~10 MiB
#
# Not carried on purpose: mlflow (the checks run with --tracking.enabled False; the trainer imports it
# only when tracking is on) and torchaudio (the trainer does not import it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=${1:-.whl}
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}                      # the target interpreter (3.11: to check the closure here)
abi=cp${PYVER/./}
mkdir -p "$dest"
# Versions that ran together in the project's venv (ENV.md), binary wheels for cp312.
pins=(
  deepspeed==0.19.8        # built below from its sdist
  hjson==3.1.0 msgpack==1.2.4 py-cpuinfo==9.0.0 ninja==1.13.2 einops==0.8.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  webdataset==1.0.2 braceexpand==0.1.7
  jiwer==4.0.0 rapidfuzz==3.14.6 click==8.5.1
  eva-decord==0.6.1
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
  psutil==7.2.2            # accelerate's dependency, so normally present; carried for import deepspeed
)
binary=()
for p in "${pins[@]}"; do [[ $p == deepspeed==* ]] || binary+=("$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --abi "$abi" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$dest" "${binary[@]}" \
    2> >(grep -v "is ignored: it is neither" >&2)

ds=$(printf '%s\n' "${pins[@]}" | grep '^deepspeed==' | cut -d= -f3)
if ! ls "$dest"/deepspeed-"$ds"-*.whl >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$ds" \
      2> >(grep -v "is ignored: it is neither" >&2)
  # No op prebuilt: DeepSpeed's setup.py then needs neither CUDA nor a GPU here; DS_ACCELERATOR=cuda
  # keeps "cuda" as the accelerator its installed build config records (cpu would be baked in here).
  DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel -q --no-deps --no-build-isolation \
      -w "$dest" "$tmp"/deepspeed-"$ds".tar.gz
fi
ls -l "$dest"
du -sh "$dest"
