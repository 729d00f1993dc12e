#!/usr/bin/env bash
# The test command: sets up what is missing, then runs the tests (on CPU; on a GPU machine the Triton
# kernels run compiled on CUDA, and without one under TRITON_INTERPRET=1: tests/constants.py).
#
#   bash tests/run.sh            the full suite, real processes included: what CI runs (.ci/run)
#   bash tests/run.sh --fast     the fast lane: `-m "not slow"`, the unit tests of every module; no
#                                training, no multi-process run, no SLURM (nor its install)
#
# Extra arguments go to pytest (e.g. `bash tests/run.sh --fast -k kernel -x`). Slow tests (marker `slow`,
# setup.cfg) start trainings or several processes: tests/e2e/ and the real-process tests beside the units.
set -euo pipefail
fast=0
if [ "${1:-}" = --fast ]; then
  fast=1
  shift
fi
export AVSR_SETUP_APT=${AVSR_SETUP_APT:-1}   # ffmpeg and espeak-ng: the synthetic corpus needs them
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
if [ "$fast" = 1 ]; then
  exec python -m pytest -m "not slow" "$@"
fi
# tests/launch/test_slurm_real.py runs the SLURM scripts on a private one-node SLURM (started and stopped
# by the tests, from a config in a temp dir): install Debian's packages where missing and we are root.
if [ "$(id -u)" = 0 ] && [ "${AVSR_INSTALL_SLURM:-1}" = 1 ] && ! { [ -x /usr/sbin/slurmctld ] &&
    [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && command -v sbatch >/dev/null; }; then
  echo "[tests] installing Debian packages for the real-SLURM tests: slurmctld slurmd slurm-client munge"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
python -m pytest "$@"
