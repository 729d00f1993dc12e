#!/usr/bin/env bash
# The body shared by train_single_node.sbatch and train_multi_node.sbatch (they `exec` it, so this
# process *is* the batch shell and receives `#SBATCH --signal=B:USR1@...`).
#
#   job.sh [--dry-run] RECIPE DS_CONFIG [trainer args...]
#
# 1. sets the NCCL / torch.distributed environment (defaults only: what you export wins);
# 2. AVSR_DRY_RUN=1 (or --dry-run): prints every node's torchrun command and, where `sbatch` is
#    installed, checks the batch script's resource lines with `sbatch --test-only`, then exits;
# 3. otherwise starts one task per node with srun; each task is `plan.py node`, which runs torchrun
#    (c10d rendezvous on the first host) and relays stop signals to the trainer processes;
# 4. signals: SLURM itself sends SIGTERM (scancel, `scontrol requeue`, preemption, time limit) to
#    every process of the job step, so the trainer gets it without help; this shell never relays a
#    SIGTERM to srun (srun answers one with SIGKILL of its tasks: "forcing job termination"). It
#    relays SIGUSR1 (the time-limit warning, `scancel --signal=USR1 --batch`) and, for a SIGTERM that
#    reached only this shell (`scancel --batch`), a SIGUSR1 too. The trainer finishes its step,
#    checkpoints, marks the MLflow run KILLED and exits 0;
# 5. after a SIGUSR1 it requeues the job (`scontrol requeue`): same job id and name -> same run folder
#    -> the next run resumes (--train.resume auto) and reattaches to its MLflow run (mlflow_run.json).
#    After a SIGTERM it does not requeue: SLURM requeues preempted `--requeue` jobs and `scontrol
#    requeue` itself, and a scancel is meant to stop. AVSR_REQUEUE=0 turns the self-requeue off.
set -euo pipefail

DRY_RUN=${AVSR_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ $# -lt 2 ]; then
  echo "usage: sbatch launch/slurm/train_{single,multi}_node.sbatch RECIPE DS_CONFIG [trainer args...]" >&2
  echo "       e.g. ... launch/recipes/lrs3_avsr.yaml ds_configs/zero3.json --train.max-steps 1000" >&2
  exit 2
fi
AVSR_REPO=${AVSR_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
# Paths given relative to the job's working directory (where you submitted from, or --chdir) are
# made absolute here; others are taken relative to the checkout (e.g. launch/recipes/...).
from_here() {
  if [ "${1#/}" = "$1" ] && [ -e "$1" ] && [ "$PWD" != "$AVSR_REPO" ]; then echo "$PWD/$1"; else echo "$1"; fi
}
RECIPE=$(from_here "$1") DS_CONFIG=$(from_here "$2")
shift 2
cd "$AVSR_REPO"
mkdir -p logs                            # the scripts' --output folder (kept in the checkout too)

# ---- software environment -------------------------------------------------------------------------
# sbatch passes on the environment it was submitted from (--export=ALL), so activating the venv (or
# `source launch/setup_env.sh`) before `sbatch` is enough. AVSR_ENV_SCRIPT=path is sourced here
# instead, on the first node, before srun (which passes the environment on to every node).
if [ "$DRY_RUN" = 0 ] && [ -n "${AVSR_ENV_SCRIPT:-}" ]; then
  set +u; source "$AVSR_ENV_SCRIPT"; set -u
  cd "$AVSR_REPO"
fi
PYTHON=${AVSR_PYTHON:-python3}            # plan.py needs only the standard library

# ---- NCCL and torch.distributed (defaults; export your own before sbatch to override) ---------------
# NCCL_SOCKET_IFNAME   interface for NCCL's bootstrap and socket transport. Set it when nodes have
#                      several (e.g. "ib0", "eth0", "^lo,docker0"); NCCL guesses otherwise, and a wrong
#                      guess shows up as a hang or "connection refused" at the first collective.
# NCCL_IB_HCA          InfiniBand adapters to use, e.g. "mlx5" or "mlx5_0,mlx5_1" (default: all).
# NCCL_IB_GID_INDEX    RoCE only: the GID index of the RoCEv2 address (often 3).
# NCCL_IB_DISABLE=1    no InfiniBand/RoCE: use TCP sockets (slow across nodes; a last resort).
# NCCL_IB_TIMEOUT      IB retransmission timeout exponent (default 20 in recent NCCL; raise on flaky fabrics).
# NCCL_DEBUG           WARN (default here); INFO prints the chosen transports/rings: run once with INFO
#                      on a new cluster and check for "NET/IB" (not "NET/Socket") between nodes.
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1
#                      a failed or timed-out collective aborts the process instead of hanging, so srun's
#                      --kill-on-bad-exit ends the whole step and the job fails fast.
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT
#                      seconds torchrun waits for its workers after it is itself signalled before it
#                      SIGKILLs them (torch default 30); long enough here for a checkpoint.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
export PYTHONUNBUFFERED=1
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: pass it on explicitly.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

plan=("$PYTHON" "$AVSR_REPO/launch/slurm/plan.py")
if [ "$DRY_RUN" != 0 ]; then
  "${plan[@]}" dry-run "$RECIPE" "$DS_CONFIG" "$@"
  # The resource lines (#SBATCH and SBATCH_* variables, plus AVSR_SBATCH_ARGS, e.g. "--partition=gpu
  # --gpus-per-node=4"), checked by the controller without submitting. AVSR_SBATCH_CHECK=0: skip.
  if [ "${AVSR_SBATCH_CHECK:-1}" != 0 ] && [ -n "${AVSR_SBATCH_SCRIPT:-}" ] && command -v sbatch >/dev/null; then
    check_rc=0
    # shellcheck disable=SC2086  # AVSR_SBATCH_ARGS is a list of options
    check=$(sbatch --test-only ${AVSR_SBATCH_ARGS:-} "$AVSR_SBATCH_SCRIPT" "$RECIPE" "$DS_CONFIG" "$@" 2>&1) || check_rc=$?
    echo "# sbatch --test-only ${AVSR_SBATCH_ARGS:-}: ${check//$'\n'/ | }"
    if [ "$check_rc" != 0 ]; then
      case $check in
        *"Unable to contact"*|*"configuration source"*|*"Could not establish"*)
          echo "[job] could not check the resource lines: no SLURM controller reachable" >&2 ;;
        *) echo "[job] SLURM would refuse (or never start) this job as configured: adapt the #SBATCH" \
                "resource lines or pass overrides (see launch/slurm/README.md)" >&2
           exit 1 ;;
      esac
    fi
  fi
  exit 0
fi

: "${SLURM_JOB_ID:?not inside a SLURM job (use AVSR_DRY_RUN=1 to only print the commands)}"
launcher=${AVSR_TORCHRUN:-torchrun}
if ! command -v "${launcher%% *}" >/dev/null; then
  echo "[job] ${launcher%% *} not found: activate the environment before sbatch or set AVSR_ENV_SCRIPT" >&2
  exit 1
fi
run_dir=$("${plan[@]}" run-dir "$RECIPE" "$DS_CONFIG" "$@")
mkdir -p "$run_dir"
nnodes=${SLURM_NNODES:-1}
echo "[job] $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}:" \
     "$nnodes node(s) ${SLURM_JOB_NODELIST:-}, run dir $run_dir"

# ---- the device is the trainer's decision; every node's environment is on record -------------------
# sbatch passes the submitting shell's variables on: a DS_ACCELERATOR=cpu exported on a login node
# without GPUs would put every rank of a GPU job on the CPU. The trainer decides (--train.device,
# default auto; --train.device cpu is how to ask for the CPU), so an inherited choice is dropped.
if [ -n "${DS_ACCELERATOR:-}" ]; then
  echo "[job] unsetting DS_ACCELERATOR=$DS_ACCELERATOR inherited from the submitting shell: the trainer" \
       "decides the device (--train.device cpu to train on CPUs)"
  unset DS_ACCELERATOR
fi
# One report per node (python -m trainer.doctor) in the job log and in $run_dir/doctor/; a blocking
# problem (e.g. GPUs the run could not use) ends the job here. AVSR_DOCTOR=0 skips it.
if [ "${AVSR_DOCTOR:-1}" != 0 ]; then
  echo "[job] environment of every node: python -m trainer.doctor -> $run_dir/doctor/"
  doctor_rc=0
  ${AVSR_SRUN:-srun} --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 \
    "$PYTHON" -m trainer.doctor --out "$run_dir/doctor" -- --config "$DS_CONFIG" --recipe "$RECIPE" "$@" \
    || doctor_rc=$?
  if [ "$doctor_rc" != 0 ]; then
    echo "[job] the doctor found a blocking problem on a node (PROBLEM lines above): not starting" >&2
    exit 1
  fi
fi

started=$(mktemp)
trap 'rm -f "$started"' EXIT
step_pid=""
requeue_wanted=""

signal_step() { if [ -n "$step_pid" ]; then kill -s "$1" "$step_pid" 2>/dev/null || true; fi; }
on_usr1() {
  echo "[job] got SIGUSR1 at $(date -Is): relaying it to the job step (the trainer checkpoints and exits)," \
       "then requeuing"
  requeue_wanted=1
  signal_step USR1
}
on_term() {
  # SLURM sent SIGTERM to the tasks as well (unless it was `scancel --batch`): srun must not get
  # one (it would SIGKILL them), so the stop is passed on as SIGUSR1, which srun forwards.
  echo "[job] got SIGTERM at $(date -Is): the trainer checkpoints and exits; not requeuing"
  signal_step USR1
}
trap on_usr1 USR1
trap on_term TERM

# One task per node; srun forwards the SIGUSR1 it receives to the tasks.
${AVSR_SRUN:-srun} --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "${plan[@]}" node "$RECIPE" "$DS_CONFIG" "$@" &
step_pid=$!

# A trapped signal interrupts `wait` while the step still runs: wait again until it is gone, then
# collect its exit status (bash keeps it for a reaped child).
while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid" || true; done
rc=0
wait "$step_pid" || rc=$?
echo "[job] job step ended with status $rc at $(date -Is)"

if [ -n "$requeue_wanted" ]; then
  if [ -f "$run_dir/results.json" ] && [ "$run_dir/results.json" -nt "$started" ]; then
    echo "[job] training finished before the stop: not requeuing"
  elif [ "${AVSR_REQUEUE:-1}" = 1 ]; then
    echo "[job] requeuing $SLURM_JOB_ID: the next run resumes from the newest checkpoint in $run_dir"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
fi
exit "$rc"
