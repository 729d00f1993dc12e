#!/usr/bin/env bash
# Source this file: it makes sure the system tools and the cached virtual environment
# exist, installs this checkout into it (editable, no deps: seconds), and exports the
# variables that runs need. The environment and DeepSpeed's compiled ops live outside
# the clone (AVSR_CACHE, default ~/.cache/avsr) so fresh clones reuse them.
set -euo pipefail
AVSR_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AVSR_CACHE=${AVSR_CACHE:-$HOME/.cache/avsr}
AVSR_VENV=${AVSR_VENV:-$AVSR_CACHE/venv}
PYTHON=${PYTHON:-python3}

# --- Debian packages: ffmpeg (video encode/decode) and espeak-ng (synthetic speech) ---
missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "[setup] need root (or passwordless sudo) to install: ${missing[*]}; install them and rerun" >&2; return 1 2>/dev/null || exit 1
  fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Python environment, rebuilt only when the declared dependencies change ---
stamp_value=$( (cat "$AVSR_REPO/pyproject.toml"; "$PYTHON" --version) | sha256sum | cut -c1-16)
stamp_file=$AVSR_VENV/.avsr-deps-stamp
# One install at a time: clones on one machine share the venv (flock waits for the other).
mkdir -p "$AVSR_CACHE"
exec 9>"$AVSR_CACHE/.setup.lock"
flock 9
if [ ! -x "$AVSR_VENV/bin/python" ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_value" ]; then
  echo "[setup] installing the Python environment into $AVSR_VENV (first time: a few minutes)"
  [ -x "$AVSR_VENV/bin/python" ] || "$PYTHON" -m venv "$AVSR_VENV"
  "$AVSR_VENV/bin/python" -m pip install -q --upgrade pip
  "$AVSR_VENV/bin/python" -m pip install -q -e "$AVSR_REPO[dev]"
  echo "$stamp_value" > "$stamp_file"
fi
flock -u 9
exec 9>&-

# This checkout's code comes first on the path: the venv is shared by every clone on the
# machine, and its editable install points at whichever clone built it.
export PYTHONPATH="$AVSR_REPO${PYTHONPATH:+:$PYTHONPATH}"

export PATH="$AVSR_VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$AVSR_CACHE/torch_extensions}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # nothing is fetched from a hub
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
cd "$AVSR_REPO"
