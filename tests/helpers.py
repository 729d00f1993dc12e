"""What the tests that start processes share, in one place: a free port, the environment of a child
process, the command line of launch/train.py (or another script) under each launcher, the tiny model's
arguments and recipe, reading a run folder (printed losses, its MLflow run), and the small training
runs that several tests read, trained once per session (fixture `trained_run` in tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.constants import REPO

TRAIN = REPO / "launch" / "train.py"
DS_CONFIGS = REPO / "ds_configs"
# The tiny model (the defaults) on the CPU: epochs of 4 micro-batches of at most 4 clips / 600 frames per
# rank, one DataLoader worker per rank.
TINY_DATA = ("--train.device", "cpu", "--data.num-workers", "1", "--data.max-frames-per-batch", "600",
             "--data.max-batch-size", "4", "--data.batches-per-epoch", "4")
# what a child must not inherit from this process: another test's launcher variables (an in-process
# DeepSpeed engine sets MASTER_PORT...: they would override the child's own rendezvous) and MLflow's
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")
STEP_LINE = re.compile(r"step (\d+)/\d+ loss (\S+)")


@contextlib.contextmanager
def exclusive(lock_file: Path):
    """Hold an exclusive lock on `lock_file` (created if missing): one process at a time, across the
    pytest-xdist workers of a session and across clones sharing $AVSR_CACHE."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def built_once(out: Path, build) -> None:
    """`build()` writes `out`, once per session whichever worker asks first; the others wait for it. A
    folder left by a build that failed is removed and built again."""
    done = out.with_name(out.name + ".done")
    with exclusive(out.with_name(out.name + ".lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build()
            done.touch()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this checkout on PYTHONPATH, one OpenMP thread per
    process (2 cores), no launcher or MLflow variables of this process; then `extra`. (TRITON_INTERPRET and
    the offline Hugging Face switches come from tests/constants.py, through os.environ.)"""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS + _MLFLOW_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def command(script: Path | str, *args: str, launcher: str = "python", nproc: int = 2) -> list[str]:
    """`script args` as a launcher starts it: "python" (no launcher, one process), "torchrun" (one node,
    --standalone), "deepspeed" (the README's `deepspeed --num_gpus N`, which passes --local_rank to the
    script) or "accelerate" (`accelerate launch --use_deepspeed` with ds_configs/zero3.json)."""
    bin_dir = Path(sys.executable).parent
    if launcher == "python":
        return [sys.executable, str(script), *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(script), *args]
    if launcher == "deepspeed":
        return [str(bin_dir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
                str(script), *args]
    if launcher == "accelerate":
        return [str(bin_dir / "accelerate"), "launch", "--num_processes", str(nproc), "--main_process_port",
                str(free_port()), "--use_deepspeed", "--deepspeed_config_file", str(DS_CONFIGS / "zero3.json"),
                str(script), *args]
    raise ValueError(f"unknown launcher {launcher!r}")


def node_commands(script: Path | str, *args: str, nodes: int = 2) -> list[list[str]]:
    """One torchrun per "node", one process each, rendezvousing with c10d on loopback as SLURM nodes do."""
    port = free_port()
    return [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
             "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=e2e",
             str(script), *args] for node in range(nodes)]


def train_args(run_dir: Path, corpus: Path | str, *extra: str, config: str = "zero3.json") -> list[str]:
    return ["--config", str(DS_CONFIGS / config), "--data.shard-dir", str(corpus), "--train.run-dir", str(run_dir),
            *extra]


def run(cmd: list[str], *, env: dict | None = None, cwd: Path = REPO, timeout: float = 900,
        ok: bool = True) -> subprocess.CompletedProcess:
    """The command to its end; with `ok`, exit 0 or a failure showing the end of its output."""
    p = subprocess.run(cmd, env=child_env() if env is None else env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{cmd[:8]} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def train(run_dir: Path, corpus: Path | str, *extra: str, launcher: str = "torchrun", nproc: int = 2,
          config: str = "zero3.json", env: dict | None = None, cwd: Path = REPO, timeout: float = 900,
          ok: bool = True) -> subprocess.CompletedProcess:
    """launch/train.py with the shipped DeepSpeed JSON `config` on `corpus` into `run_dir`."""
    cmd = command(TRAIN, *train_args(run_dir, corpus, *extra, config=config), launcher=launcher, nproc=nproc)
    return run(cmd, env=env, cwd=cwd, timeout=timeout, ok=ok)


def printed_losses(output: str) -> dict[int, str]:
    """step -> the loss as the trainer printed it ("step N/M loss X")."""
    return {int(m[1]): m[2] for m in STEP_LINE.finditer(output)}


def mlflow_run(run_dir: Path):
    """(client, run) of the run folder's own MLflow store."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return client, client.get_run(run_id)


def mlflow_losses(run_dir: Path) -> list[float]:
    """train/loss of every logged step, in step order."""
    client, run_ = mlflow_run(run_dir)
    return [m.value for m in sorted(client.get_metric_history(run_.info.run_id, "train/loss"), key=lambda m: m.step)]


def tiny_recipe(path: Path, corpus: Path, max_steps: int, monitor_every: int = 0) -> Path:
    """The recipe of the stop-signal and SLURM tests: the tiny model on `corpus`, checkpoints only when
    stopped or at the end, the validation split evaluated at the end, no export."""
    path.write_text(f"""
data: {{shard_dir: {corpus}, num_workers: 1, max_frames_per_batch: 600, max_batch_size: 4}}
train: {{device: cpu, max_steps: {max_steps}, log_every: 1, warmup_steps: 1, save_every: 1000, eval_max_new_tokens: 4,
        final_eval_splits: [val], eval_untrained: false, export_on_finish: false}}
monitor: {{every: {monitor_every}, probe_batch_size: 2}}
""")
    return path


# ---- the runs several tests read, trained once per session ------------------------------------------
TINY_STEPS = 6
_TINY_RUN = (*TINY_DATA, "--train.max-steps", str(TINY_STEPS), "--train.log-every", "1", "--train.warmup-steps", "1",
             "--train.lr", "3e-3", "--train.save-every", "3", "--train.eval-untrained", "False")


_ZERO3_2PROC = (*_TINY_RUN, "--train.eval-max-new-tokens", "6", "--train.final-eval-splits", "val",
                "--model.decorrelation-weight", "1.0", "--monitor.every", "3", "--monitor.probe-batch-size", "2")


@dataclass(frozen=True)
class RunSpec:
    launcher: str
    nproc: int
    args: tuple[str, ...]
    """launch/train.py's options after --config, --data.shard-dir and --train.run-dir."""
    config: str = "zero3.json"
    env: tuple[tuple[str, str], ...] = ()


RUNS = {
    # 2 ranks, the shipped ZeRO-3 JSON under the users' launcher, everything on: sink monitoring (steps 0, 3, 6),
    # the decorrelation loss, MLflow, checkpoints at steps 3 and 6, the end-of-run validation WER, exports.
    # The reference of tests/e2e/test_resume.py, which reruns its exact command.
    "zero3_2proc": RunSpec("deepspeed", 2, _ZERO3_2PROC, env=(("MLFLOW_EXPERIMENT_NAME", "e2e"),)),
    # 1 process: what the offline tools read (launch/evaluate.py, launch/analyze_sinks.py); the end-of-run
    # evaluation on 3 test utterances with 2 beams only
    "zero3_1proc": RunSpec("torchrun", 1, (*_TINY_RUN, "--train.eval-max-new-tokens", "4", "--train.final-eval-splits",
                                           "test", "--train.final-eval-max-samples", "3", "--train.final-eval-beams",
                                           "2", "--monitor.every", "3", "--monitor.probe-batch-size", "2"),
                           env=(("MLFLOW_EXPERIMENT_NAME", "e2e"),)),
    # the first in bf16 (DeepSpeed's CPU accelerator emulates it: ~6x slower), for tests/e2e/test_train_bf16.py
    "zero3_2proc_bf16": RunSpec("deepspeed", 2, (*_ZERO3_2PROC, "--train.precision", "bf16"),
                                env=(("MLFLOW_EXPERIMENT_NAME", "e2e"),)),
    # ZeRO-2 on 2 ranks, nothing after training: the other stage for tests/e2e/test_world_size_resume.py
    "zero2_2proc": RunSpec("torchrun", 2, (*_TINY_RUN, "--train.final-eval-splits", "--train.export-on-finish", "False",
                                           "--monitor.every", "0", "--tracking.enabled", "False"), config="zero2.json"),
}


@dataclass(frozen=True)
class TrainedRun:
    folder: Path
    """The run folder: read it, never write into it (tests that do use a copy)."""
    output: str
    """What the training printed (stdout, then stderr)."""
    spec: RunSpec

    def command(self, run_dir: Path, corpus: Path | str, *extra: str) -> list[str]:
        """The run's own command line, into `run_dir`, with `extra` options last."""
        return command(TRAIN, *train_args(run_dir, corpus, *self.spec.args, *extra, config=self.spec.config),
                       launcher=self.spec.launcher, nproc=self.spec.nproc)

    def env(self, **extra: str) -> dict[str, str]:
        return child_env(**{**dict(self.spec.env), **extra})

    def copy(self, dest: Path) -> Path:
        """A copy of the run folder at `dest` (a copied run folder is a run of its own: it resumes there)."""
        shutil.copytree(self.folder, dest)
        return dest


class TrainedRuns:
    """RUNS by name, each trained on first use and kept for the session, in `root`, which the xdist workers
    share: the first to ask trains it while the others wait. A failed training is not tried again: every
    test that needs it fails with its output."""

    def __init__(self, root: Path, corpus: Path):
        self.root, self.corpus = root, corpus

    def __call__(self, name: str) -> TrainedRun:
        folder = self.root / name
        output, failed = self.root / f"{name}.output", self.root / f"{name}.failed"
        with exclusive(self.root / f"{name}.lock"):
            if not output.exists() and not failed.exists():
                plan = TrainedRun(folder, "", RUNS[name])
                p = run(plan.command(folder, self.corpus), env=plan.env(), ok=False)
                if p.returncode != 0:
                    failed.write_text(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
                else:
                    output.write_text(p.stdout + p.stderr)
        assert not failed.exists(), f"the session run {name!r} failed to train:\n{failed.read_text()}"
        return TrainedRun(folder, output.read_text(), RUNS[name])
