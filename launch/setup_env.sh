#!/usr/bin/env bash
# Source this file: it makes sure the cached virtual environment exists, installs this checkout into
# it (editable, no deps: seconds), puts it on PATH and PYTHONPATH and changes into the checkout. The
# environment and DeepSpeed's compiled ops live outside the clone (AVSR_CACHE, default ~/.cache/avsr)
# so fresh clones reuse them.
#
# Safe to source in an interactive shell: it leaves the shell's options (set -e/-u/-o pipefail) as
# it found them and exports no device choice (the trainer decides: --train.device). The Debian
# packages ffmpeg and espeak-ng are needed only to build the synthetic corpus (the demo, the tests):
# it installs them only when AVSR_SETUP_APT=1 (launch/demo.sh, tests/run.sh set it), and otherwise
# says they are missing; LRS3 training needs neither.
_avsr_shell_opts=$(set +o)     # errexit reads "off" in a command substitution: kept apart below
case $- in *e*) _avsr_errexit=1 ;; *) _avsr_errexit=0 ;; esac

_avsr_setup() {
  AVSR_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  AVSR_CACHE=${AVSR_CACHE:-$HOME/.cache/avsr}
  AVSR_VENV=${AVSR_VENV:-$AVSR_CACHE/venv}
  # The installs run in a separate bash with its own strict options (a subshell would not do: `set -e`
  # is ignored inside a function called in an `||` list): nothing of them reaches the caller.
  AVSR_REPO=$AVSR_REPO AVSR_CACHE=$AVSR_CACHE AVSR_VENV=$AVSR_VENV PYTHON=${PYTHON:-python3} \
    AVSR_SETUP_APT=${AVSR_SETUP_APT:-0} bash -euo pipefail -c "$(cat <<'INSTALL'
  # --- Debian packages: ffmpeg (video encode/decode) and espeak-ng (synthetic speech) ---
  missing=()
  command -v ffmpeg >/dev/null || missing+=(ffmpeg)
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  if [ ${#missing[@]} -gt 0 ] && [ "${AVSR_SETUP_APT:-0}" != 1 ]; then
    echo "[setup] not installed: ${missing[*]} (needed only to build the synthetic corpus: the demo and" \
         "the tests; AVSR_SETUP_APT=1 installs them)" >&2
  elif [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "[setup] need root (or passwordless sudo) to install: ${missing[*]}; install them and rerun" >&2
      exit 1
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
    # pip compiles the bytecode of every file on one core (~50 s of the install, torch's mostly); compileall
    # on every core takes half that. It has to be there up front: where PYTHONDONTWRITEBYTECODE is set,
    # imports never write it and every process start would compile what it imports again.
    "$AVSR_VENV/bin/python" -m pip install -q --no-compile -e "$AVSR_REPO[dev]"
    site=$("$AVSR_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$AVSR_VENV/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true   # a few packages ship Python 2 files
    echo "$stamp_value" > "$stamp_file"
  fi
INSTALL
)" </dev/null || return 1

  # This checkout's code comes first on the path: the venv is shared by every clone on the
  # machine, and its editable install points at whichever clone built it.
  export PYTHONPATH="$AVSR_REPO${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$AVSR_VENV/bin:$PATH"
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$AVSR_CACHE/torch_extensions}
  # Offline unless the caller says otherwise (HF_HUB_OFFLINE=0 before sourcing: hub names are fetched).
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-${HF_HUB_OFFLINE:-1}}
  cd "$AVSR_REPO" || return 1
}

_avsr_rc=0
_avsr_setup || _avsr_rc=$?
eval "$_avsr_shell_opts"
if [ "$_avsr_errexit" = 1 ]; then set -e; else set +e; fi
unset -f _avsr_setup
unset -v _avsr_shell_opts _avsr_errexit
if [ "$_avsr_rc" != 0 ]; then unset -v _avsr_rc; return 1 2>/dev/null || exit 1; fi
unset -v _avsr_rc
