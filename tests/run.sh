#!/usr/bin/env bash
# The test command: sets up what is missing, then runs the whole suite on CPU.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k kernel -x`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
python -m pytest "$@"
