#!/usr/bin/env bash
# The test command: sets up what is missing, then runs the whole suite (on CPU; on a GPU machine the
# Triton kernels run compiled on CUDA, and without one under TRITON_INTERPRET=1: tests/conftest.py).
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k kernel -x`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
python -m pytest "$@"
