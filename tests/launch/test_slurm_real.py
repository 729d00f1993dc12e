"""The SLURM scripts on a real SLURM: a private one-node cluster (munged, slurmctld, slurmd from
Debian's packages, started from a temp-dir config: tests/support/slurm_cluster.py) runs the real sbatch
scripts on the demo model (tiny, 2 ranks, a few steps). Skipped where the daemons are not installed
or not root (tests/run.sh installs them as root).

- a chain: a real time limit (`--time=3 --signal=B:USR1@170`: SIGUSR1 to the batch shell, the job
  requeues itself), then `scontrol requeue` (SIGTERM to every process of the step, then SLURM's own
  requeue), then the end: checkpoints at the stop steps, Restarts=2, one MLflow run (KILLED in
  between, FINISHED at the end), each step logged once (that a resume reproduces the uninterrupted
  losses: tests/e2e/test_resume.py);
- `scancel` (SIGTERM to every process): checkpoint, KILLED, not requeued;
- submitted from outside the checkout, and the dry run's `sbatch --test-only` check.
"""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import free_port, tiny_recipe
from tests.support.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slow

SINGLE = REPO / "launch" / "slurm" / "train_single_node.sbatch"
# what the demo needs on a CPU-only node with 2 cores (the resource lines as shipped ask for GPUs)
CPU_NODE = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=6000"]
MAX_STEPS = 8
# what a stop must not cause (a DataLoader worker or the figure pool dying, a crash, SLURM's SIGKILL)
FAILURES = ("killed by signal", "terminated abruptly", "Traceback", "task 0: Killed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("slurm"))
    try:
        c = SlurmCluster.start(root)
    except SlurmUnavailable as err:
        pytest.skip(f"no private SLURM: {err}")
    yield c
    c.stop()


def _job_env(cluster: SlurmCluster) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "AVSR_", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"))}
    env.update(OMP_NUM_THREADS="1", AVSR_NPROC_PER_NODE="2",
               AVSR_RDZV_PORT=str(free_port()), MLFLOW_EXPERIMENT_NAME="slurm", PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return cluster.env(env)


def _sbatch(cluster, *args, cwd: Path, env: dict) -> str:
    p = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def _job(cluster, job: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=cluster.env(), capture_output=True,
                         text=True, timeout=180).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


class Watch:
    """A job's log and state, and waiting on them (with the log in the failure message)."""

    def __init__(self, cluster, job: str, log: Path):
        self.cluster, self.job, self.log = cluster, job, log

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def state(self) -> dict:
        return _job(self.cluster, self.job)

    def until(self, ready, what: str, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                pytest.fail(f"job {self.job}: no {what} within {timeout} s; state {self.state()}\n"
                            f"{self.text()[-5000:]}\n{self.cluster.logs('slurmctld')[-2000:]}")
            time.sleep(1)

    def logged(self, needle: str, count: int = 1) -> bool:
        return self.text().count(needle) >= count

    def pending_again(self, restarts: int, *updates: str) -> None:
        """Wait for the requeued job to be pending, then let it start now (not after SLURM's
        ~2 min BeginTime delay for requeued jobs), with `scontrol update` fields if given."""
        self.until(lambda: self.state().get("JobState") == "PENDING"
                   and int(self.state().get("Restarts", 0)) == restarts, f"requeue #{restarts}")
        # SLURM's delay is what keeps a restart clear of the ended run's revoked job credential: slurmd
        # refuses a credential made in the second of the revocation or before ("Job credential revoked",
        # the job FAILED). Let a second or two pass first.
        time.sleep(2)
        _scontrol(self.cluster, "update", f"JobId={self.job}", *updates, "StartTime=now")

    def ended(self) -> dict:
        self.until(lambda: self.state().get("JobState") in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"),
                   "end")
        return self.state()


def _scontrol(cluster, *args):
    subprocess.run(["scontrol", *args], env=cluster.env(), check=True, timeout=30, capture_output=True)


def _mlflow(run: Path):
    from mlflow.tracking import MlflowClient
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    return client, run_id


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def _stop_step(text: str, nth: int) -> int:
    """The step of the nth stop (every rank logs it)."""
    steps = [int(part.split(";")[0]) for part in text.split("stopped by signal at step ")[1:]]
    return list(dict.fromkeys(steps))[nth - 1]


def _failures(log: str) -> list[str]:
    return [f for f in FAILURES if f in log] + re.findall(r"sink figures for step \d+ failed.*", log)


def test_time_limit_and_requeue_chain_resumes_and_logs_each_step_once(cluster, tmp_path, synth_corpus):
    env = _job_env(cluster)
    tiny_recipe(tmp_path / "tiny.yaml", synth_corpus, MAX_STEPS, monitor_every=4)
    # submitted from outside the checkout (recipe path relative to there, own --output), with a real time
    # limit whose warning (SIGUSR1 to the batch shell) comes 10-40 s after the start
    run = tmp_path / "chain"
    job = _sbatch(cluster, *CPU_NODE, "--job-name=avsr-chain", "--time=3", "--signal=B:USR1@170",
                  f"--output={tmp_path}/%x-%j.out", str(SINGLE), "tiny.yaml", "ds_configs/zero3.json",
                  "--train.run-dir", str(run), cwd=tmp_path, env=env)
    w = Watch(cluster, job, tmp_path / f"avsr-chain-{job}.out")
    try:
        # 1. the time-limit warning: held until the trainer can act, checkpoint, the job requeues
        #    itself; the next start gets a longer limit so that only the test's signals stop it
        w.pending_again(1, "TimeLimit=30")
        first = _stop_step(w.text(), 1)
        assert "[job] got SIGUSR1" in w.text() and _latest(run) == f"step_{first:08d}", w.text()[-3000:]
        client, run_id = _mlflow(run)
        assert client.get_run(run_id).info.status == "KILLED"

        # 2. scontrol requeue: SIGTERM to every process of the step (DataLoader workers and figure
        #    pool included), then SLURM requeues the job itself
        w.until(lambda: w.logged("resumed from") and w.logged(f"step {first + 1}/"), "resumed training")
        _scontrol(cluster, "requeue", job)
        w.pending_again(2)
        second = _stop_step(w.text(), 2)
        assert second > first and _latest(run) == f"step_{second:08d}"
        assert _mlflow(run)[1] == run_id and client.get_run(run_id).info.status == "KILLED"

        # 3. the end
        final = w.ended()
    finally:
        subprocess.run(["scancel", job], env=cluster.env(), timeout=180)
    log = w.text()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "2", (final, log[-3000:])
    assert not _failures(log), log[-6000:]
    assert log.count("[job] requeuing") == 1         # the scontrol requeue was SLURM's own
    assert _mlflow(run)[1] == run_id and client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(1, MAX_STEPS + 1)), steps          # each step logged once
    val = [m.step for m in client.get_metric_history(run_id, next(k for k in client.get_run(run_id).data.metrics
                                                                   if k.startswith("val/")))]
    assert val == [MAX_STEPS], val                                        # the final evaluation, once
    assert (run / "sinks" / f"step_{4:07d}" / "report.json").is_file()


def test_scancel_checkpoints_and_stops(cluster, tmp_path, synth_corpus):
    env = _job_env(cluster)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", synth_corpus, MAX_STEPS)
    run = tmp_path / "cancelled"
    # submitted from elsewhere with --chdir: the script's own logs/ output lands in the checkout
    job = _sbatch(cluster, *CPU_NODE, "--job-name=avsr-cancel", f"--chdir={REPO}", str(SINGLE), str(recipe),
                  "ds_configs/zero3.json", "--train.run-dir", str(run), cwd=tmp_path, env=env)
    w = Watch(cluster, job, REPO / "logs" / f"avsr-cancel-{job}.out")
    try:
        w.until(lambda: w.logged("step 2/"), "step 2")
        subprocess.run(["scancel", job], env=cluster.env(), check=True, timeout=180)
        final = w.ended()
    finally:
        subprocess.run(["scancel", job], env=cluster.env(), timeout=180)
    log = w.text()
    assert final["JobState"] == "CANCELLED" and final["Restarts"] == "0", (final, log[-3000:])
    stopped = _stop_step(log, 1)
    assert stopped >= 2 and _latest(run) == f"step_{stopped:08d}", log[-3000:]
    client, run_id = _mlflow(run)
    assert client.get_run(run_id).info.status == "KILLED"
    assert not _failures(log) and "[job] requeuing" not in log, log[-6000:]
    w.log.unlink(missing_ok=True)


def test_dry_run_checks_the_resource_lines_with_the_controller(cluster):
    env = {**_job_env(cluster), "AVSR_DRY_RUN": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "1"}
    args = ["bash", str(SINGLE), "launch/recipes/demo.yaml", "ds_configs/zero3.json"]
    shipped = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert shipped.returncode != 0 and "Invalid generic resource" in shipped.stdout, shipped.stdout + shipped.stderr
    assert "SLURM would refuse" in shipped.stderr
    adapted = subprocess.run(args, env={**env, "AVSR_SBATCH_ARGS": " ".join(CPU_NODE)}, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert adapted.returncode == 0 and "to start at" in adapted.stdout, adapted.stdout + adapted.stderr


# stands in for torchrun: records what the trainer processes would inherit, then ends the job cleanly
ENV_DUMP = """#!/usr/bin/env bash
env > "$AVSR_ENV_DUMP.$SLURM_JOB_ID"
"""


def test_a_login_node_without_gpus_passes_no_device_choice(cluster, tmp_path):
    """A login node without GPUs: `source launch/setup_env.sh`, then sbatch (which exports the shell's
    environment); once as setup_env.sh leaves the shell, once with an old DS_ACCELERATOR=cpu exported.
    The job's trainer environment carries no DS_ACCELERATOR, and every node's doctor report is logged."""
    if not (Path(sys.prefix) / ".avsr-deps-stamp").is_file():
        pytest.skip("not running in the project's cached venv (setup_env.sh would install one)")
    dump = tmp_path / "torchrun_env"
    fake = tmp_path / "torchrun"
    fake.write_text(ENV_DUMP)
    fake.chmod(0o755)
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tmp_path / "no_corpus_needed", MAX_STEPS)
    env = {k: v for k, v in _job_env(cluster).items() if k != "DS_ACCELERATOR"}
    env.update(AVSR_VENV=sys.prefix, AVSR_CACHE=str(tmp_path / "cache"), AVSR_TORCHRUN=str(fake),
               AVSR_ENV_DUMP=str(dump))
    jobs = {}
    for case, exported in (("sourced", ""), ("inherited", "export DS_ACCELERATOR=cpu; ")):
        login = (f"{exported}source {REPO}/launch/setup_env.sh && env | grep -c '^DS_ACCELERATOR=' ; "
                 f"sbatch --parsable {' '.join(CPU_NODE)} --job-name=avsr-env-{case} --output={tmp_path}/{case}.out "
                 f"{SINGLE} {recipe} ds_configs/zero3.json --train.run-dir {tmp_path / case} --train.device auto")
        p = subprocess.run(["bash", "-c", login], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        count, job_id = p.stdout.split()[-2:]
        assert count == ("0" if case == "sourced" else "1")      # the login shell as the user has it
        jobs[case] = Watch(cluster, job_id.split(";")[0], tmp_path / f"{case}.out")
    for case, watch in jobs.items():
        assert watch.ended()["JobState"] == "COMPLETED", watch.text()
        trainer_env = Path(f"{dump}.{watch.job}").read_text().splitlines()
        assert not [v for v in trainer_env if v.startswith("DS_ACCELERATOR=")], watch.text()
        assert "SLURM_JOB_ID=" + watch.job in trainer_env          # it is the job's environment
        log = watch.text()
        assert ("[job] unsetting DS_ACCELERATOR=cpu inherited" in log) == (case == "inherited"), log
        assert "the trainer will use: device cpu" in log and "\nusable" in log, log
        reports = list((tmp_path / case / "doctor").glob("doctor-*.txt"))
        assert len(reports) == 1 and "device: cpu (auto: no GPU on this machine" in reports[0].read_text()
