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
#
# Both lanes run on AVSR_TEST_WORKERS pytest-xdist workers (default 2; 0 = one process, as plain pytest),
# a test file per worker at a time (`--dist loadfile`: its module fixtures built once), the files with
# slow tests first (tests/conftest.py). Much of a slow test is waiting (a SLURM requeue, a server start,
# a signal's grace period): the other worker computes meanwhile. The corpus and the trained runs the
# tests share are built once per session, by the first worker that needs them.
set -euo pipefail
fast=0
if [ "${1:-}" = --fast ]; then
  fast=1
  shift
fi
export AVSR_SETUP_APT=${AVSR_SETUP_APT:-1}   # ffmpeg and espeak-ng: the synthetic corpus needs them
source "$(dirname "${BASH_SOURCE[0]}")/../launch/setup_env.sh"
workers=${AVSR_TEST_WORKERS:-2}
xdist=()
[ "$workers" = 0 ] || xdist=(-n "$workers" --dist loadfile)
if [ "$fast" = 1 ]; then
  exec python -m pytest "${xdist[@]}" -m "not slow" "$@"
fi
# tests/launch/test_slurm_real.py runs the SLURM scripts on a private one-node SLURM (started and stopped
# by the tests, from a config in a temp dir): install Debian's packages where missing and we are root.
if [ "$(id -u)" = 0 ] && [ "${AVSR_INSTALL_SLURM:-1}" = 1 ] && ! { [ -x /usr/sbin/slurmctld ] &&
    [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ] && command -v sbatch >/dev/null; }; then
  echo "[tests] installing Debian packages for the real-SLURM tests: slurmctld slurmd slurm-client munge"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
python -m pytest "${xdist[@]}" "$@"
