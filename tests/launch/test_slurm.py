"""The SLURM launch path on CPU: host lists, the per-node plan and its dry run, and
a real preemption cycle through the batch script (fake `srun`/`scontrol`, real torchrun and
trainer): SIGUSR1 -> checkpoint, MLflow run KILLED, `scontrol requeue`; the requeued job resumes."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import free_port, tiny_recipe
from tests.support.slurm_cluster import can_start

sys.path.insert(0, str(REPO / "launch" / "slurm"))
import plan  # noqa: E402

MULTI = REPO / "launch" / "slurm" / "train_multi_node.sbatch"
SINGLE = REPO / "launch" / "slurm" / "train_single_node.sbatch"
DEMO_RECIPE = REPO / "launch" / "recipes" / "demo.yaml"


@pytest.mark.parametrize("text, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("a[001-002],b[1,3]", ["a001", "a002", "b1", "b3"]),
])
def test_hostlist_expansion(text, hosts):
    assert plan.expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]"])
def test_bad_hostlists_are_clear_errors(bad):
    with pytest.raises(ValueError, match="host list|range|host index"):
        plan.expand_hostlist(bad)


@pytest.mark.parametrize("env, n", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4), ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "a100:2,h100:2"}, 4), ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"AVSR_NPROC_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "8"}, 2), ({}, 1),
])
def test_processes_per_node_follow_the_gpus(env, n):
    assert plan.gpus_per_node(env) == n


def _slurm_env(**extra) -> dict:
    # PATH stays whole (on a login node scontrol sits in /usr/bin with bash): a real scontrol expands
    # the host lists as plan.py's own parser does. No controller is asked: AVSR_SBATCH_CHECK=0.
    # A launcher's variables left in this process by an earlier in-process DeepSpeed test (MASTER_PORT...)
    # would override the job's own rendezvous port: dropped as well.
    launcher = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "AVSR_", "NCCL_")) and k not in launcher}
    env.update({"AVSR_SBATCH_CHECK": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lrs3_avsr",
                "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
                "AVSR_DRY_RUN": "1"})
    env.update(extra)
    return env


def _dry_run(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(MULTI), *args], env=_slurm_env(**env), cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_dry_run_prints_each_nodes_torchrun_command():
    p = _dry_run("launch/recipes/lrs3_avsr.yaml", "ds_configs/zero3.json", "--train.max-steps", "10",
                 NCCL_SOCKET_IFNAME="ib0")
    assert p.returncode == 0, p.stderr
    nodes = [line for line in p.stdout.splitlines() if line.startswith("[node ")]
    assert [n.split("]")[0] for n in nodes] == ["[node 0 gpu07", "[node 1 gpu08"]
    port = 29500 + 4242 % 2000                   # from the job id: stable across requeues
    for rank, line in enumerate(nodes):
        for part in ("torchrun", "--nnodes=2", "--nproc_per_node=8", f"--node_rank={rank}",
                     "--rdzv_backend=c10d", f"--rdzv_endpoint=gpu07:{port}", "--rdzv_id=4242",
                     "launch/train.py --config ds_configs/zero3.json --recipe launch/recipes/lrs3_avsr.yaml",
                     "--train.run-dir runs/lrs3_avsr", "--train.max-steps 10"):
            assert part in line, (part, line)
    assert "NCCL_SOCKET_IFNAME=ib0" in p.stdout and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in p.stdout


def test_dry_run_keeps_a_given_run_dir_and_port():
    p = _dry_run("launch/recipes/lrs3_asr.yaml", "ds_configs/zero2.json", "--train.run-dir", "/scratch/r1",
                 AVSR_RDZV_PORT="31000", SLURM_JOB_NODELIST="cn5", SLURM_NNODES="1")
    assert p.returncode == 0, p.stderr
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("[node ")]
    assert "--rdzv_endpoint=cn5:31000" in line and line.count("--train.run-dir") == 1
    assert "/scratch/r1" in line


@pytest.mark.parametrize("args, env, message", [
    ((), {}, "usage:"),
    (("launch/recipes/lrs3_avsr.yaml",), {}, "usage:"),
    (("launch/recipes/nope.yaml", "ds_configs/zero3.json"), {}, "recipe 'launch/recipes/nope.yaml' not found"),
    (("launch/recipes/lrs3_avsr.yaml", "ds_configs/zero3.json"), {"SLURM_NNODES": "3"},
     "SLURM_NNODES=3 but the host list has 2 hosts"),
    (("launch/recipes/lrs3_avsr.yaml", "ds_configs/zero3.json"), {"SLURM_JOB_NODELIST": ""},
     "SLURM_JOB_NODELIST is not set"),
])
def test_launch_mistakes_are_clear_errors(args, env, message):
    p = _dry_run(*args, **env)
    assert p.returncode != 0
    assert message in p.stderr + p.stdout


def test_outside_slurm_without_dry_run_refuses():
    env = _slurm_env(AVSR_DRY_RUN="0")
    env.pop("SLURM_JOB_ID")
    p = subprocess.run(["bash", str(SINGLE), "launch/recipes/lrs3_avsr.yaml", "ds_configs/zero3.json"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "not inside a SLURM job" in p.stderr


def test_a_spooled_copy_finds_the_checkout_or_says_how(tmp_path):
    """slurmd runs a copy of the batch script from its spool folder: the checkout is found from the
    working directory (sbatch --chdir) or scontrol's Command=, else a message says what to set."""
    import shutil
    copy = tmp_path / "slurm_script"
    shutil.copy(SINGLE, copy)
    args = ["bash", str(copy), "launch/recipes/demo.yaml", "ds_configs/zero3.json"]
    env = _slurm_env(SLURM_NNODES="1", SLURM_JOB_NODELIST="n1")
    lost = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert lost.returncode != 0 and "export AVSR_REPO=/path/to/checkout" in lost.stderr, lost.stderr
    found = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and "[node 0 n1]" in found.stdout, found.stderr


def test_paths_relative_to_the_submit_directory(tmp_path):
    (tmp_path / "mine.yaml").write_text(DEMO_RECIPE.read_text())
    p = subprocess.run(["bash", str(SINGLE), "mine.yaml", "ds_configs/zero3.json"], cwd=tmp_path, text=True,
                       env=_slurm_env(SLURM_NNODES="1", SLURM_JOB_NODELIST="n1"), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"--recipe {tmp_path / 'mine.yaml'}" in p.stdout and "--config ds_configs/zero3.json" in p.stdout


# ---- a real preemption cycle ---------------------------------------------------------------------
FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: drop srun's options, run the task here as node 0 (exec: signals reach it directly)
while [ "${1#--}" != "$1" ]; do shift; done
export SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo 127.0.0.1; exit 0; fi
echo "$@" >> "$SCONTROL_LOG"
"""


def _launch(tmp: Path, recipe: Path, *extra: str, restart: int = 0) -> subprocess.Popen:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _slurm_env(AVSR_DRY_RUN="0", SLURM_JOB_ID="77", SLURM_JOB_NAME="tiny", SLURM_JOB_NODELIST="localhost",
                     SLURM_NNODES="1", SLURM_RESTART_COUNT=str(restart), AVSR_HOSTS="127.0.0.1",
                     AVSR_NPROC_PER_NODE="1", AVSR_RDZV_PORT=str(free_port()),
                     AVSR_TORCHRUN=f"{sys.executable} -m torch.distributed.run", AVSR_PYTHON=sys.executable,
                     AVSR_RUN_DIR=str(tmp / "run"), SCONTROL_LOG=str(tmp / "scontrol.log"),
                     OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                     MLFLOW_EXPERIMENT_NAME="slurm")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(["bash", str(SINGLE), str(recipe), "ds_configs/zero3.json", *extra], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _collect(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    t.start()
    return t


@pytest.mark.slow
@pytest.mark.skipif(can_start(), reason="a real SLURM runs here: tests/launch/test_slurm_real.py runs this path on it")
def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, synth_corpus):
    from mlflow.tracking import MlflowClient
    recipe = tiny_recipe(tmp_path / "tiny.yaml", synth_corpus, max_steps=60)
    run = tmp_path / "run"

    job = _launch(tmp_path, recipe)
    lines: list[str] = []
    reader = _collect(job, lines)
    deadline = time.time() + 400
    while not any("step 2/60" in x for x in lines):         # training is under way
        assert job.poll() is None and time.time() < deadline, "".join(lines[-80:])
        time.sleep(0.5)
    job.send_signal(__import__("signal").SIGUSR1)           # what --signal=B:USR1@180 does
    assert job.wait(timeout=300) == 0, "".join(lines[-80:])
    reader.join(10)
    log = "".join(lines)
    assert "stopped by signal at step" in log, log[-4000:]
    stopped = int(log.split("stopped by signal at step ")[1].split(";")[0])
    assert 2 <= stopped < 60
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"

    # the requeued job (same id, name, run folder) resumes and finishes; nothing more to requeue
    job = _launch(tmp_path, recipe, "--train.max-steps", str(stopped + 2), restart=1)
    out, _ = job.communicate(timeout=600)
    assert job.returncode == 0, out[-4000:]
    assert f"at step {stopped}" in out and "resumed from" in out, out[-4000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(1, stopped + 3)), steps
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
