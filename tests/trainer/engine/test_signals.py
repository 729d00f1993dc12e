"""Stop signals with real processes, outside SLURM: SIGTERM/SIGUSR1 reach the helper processes too
(DataLoader workers), the final evaluation keeps a complete result, and the `deepspeed` launcher:
SIGTERM to the runner only (it dies without passing it on), then `kill -TERM -PGID` on the whole
process group. (The figure pool: tests/trainer/monitor/test_monitor.py; a real SLURM: tests/launch/test_slurm_real.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests.constants import REPO
from tests.helpers import TRAIN, child_env, command, tiny_recipe


def _helpers(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children(recursive=True)]


def test_loader_workers_survive_stop_signals_and_end_on_close(synth_corpus):
    from trainer.data import DataConfig, build_train_loader
    from trainer.data.stream import TrainStream
    from trainer.model.config import ModelConfig

    cfg = DataConfig(shard_dir=str(synth_corpus), num_workers=2, max_frames_per_batch=600, max_batch_size=4,
                     batches_per_epoch=40)
    before = {p.pid for p in _helpers(os.getpid())}
    stream = TrainStream(lambda epoch: build_train_loader(cfg, ModelConfig().streams(), 0, 1, epoch))
    first = next(stream)
    workers = [p for p in _helpers(os.getpid()) if p.pid not in before]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    for w in workers:                        # what SLURM does to every process of a job step
        w.send_signal(signal.SIGTERM)
        w.send_signal(signal.SIGUSR1)
    time.sleep(1)
    assert all(w.status() != psutil.STATUS_ZOMBIE for w in workers)
    rest = [next(stream) for _ in range(5)]  # no "DataLoader worker ... is killed by signal"
    assert len(rest) == 5 and first["keys"]
    t0 = time.time()
    stream.close()                           # ends the workers although they ignore SIGTERM
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive and time.time() - t0 < 20
    assert stream.position == 6 and next(stream) is not None     # and a later next() rebuilds the epoch


def test_final_stages_survive_a_restart_at_the_same_step_only(tmp_path):
    from trainer.engine.trainer import Trainer

    first = SimpleNamespace(rank=0, world_size=1, run_dir=tmp_path, step=40)
    done = Trainer._final_stages(first)
    assert done == {}
    Trainer._final_stage_done(first, done, "val", {"wer": 0.5})
    again = SimpleNamespace(rank=0, world_size=1, run_dir=tmp_path, step=40)     # the requeued job
    assert Trainer._final_stages(again) == {"val": {"wer": 0.5}}
    longer = SimpleNamespace(rank=0, world_size=1, run_dir=tmp_path, step=60)    # resumed with more steps
    assert Trainer._final_stages(longer) == {}


# ---- the deepspeed launcher ---------------------------------------------------------------------
def _deepspeed(recipe: Path, run: Path) -> tuple[subprocess.Popen, list[str]]:
    cmd = command(TRAIN, "--config", "ds_configs/zero3.json", "--recipe", str(recipe), "--train.run-dir", str(run),
                  launcher="deepspeed")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(MLFLOW_EXPERIMENT_NAME="signals"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)   # its own process group
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], needle: str, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not any(needle in x for x in lines):
        assert time.time() < deadline, f"no {needle!r}:\n" + "".join(lines[-60:])
        time.sleep(0.5)


def _stopped_at(lines: list[str]) -> int:
    text = "".join(lines)
    return int(text.split("stopped by signal at step ")[-1].split(";")[0])


@pytest.mark.slow
def test_deepspeed_launcher_stops_with_a_checkpoint_on_sigterm(tmp_path, synth_corpus):
    from mlflow.tracking import MlflowClient

    recipe = tiny_recipe(tmp_path / "tiny.yaml", synth_corpus, max_steps=40)
    run = tmp_path / "run"

    # 1. SIGTERM to the `deepspeed` runner only: it dies (no handler); the ranks see it gone
    proc, lines = _deepspeed(recipe, run)
    _wait_for(lines, "step 2/40")
    launcher = [p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    assert launcher, "".join(lines[-40:])
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM
    gone, alive = psutil.wait_procs(launcher, timeout=120)
    assert not alive, "".join(lines[-60:])
    _wait_for(lines, "done: ", timeout=10)
    first = _stopped_at(lines)
    assert "launcher process" in "".join(lines) and 2 <= first < 40
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{first:08d}"
    run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"

    # 2. the same command resumes; `kill -TERM -PGID`: runner, launcher, ranks and DataLoader workers
    proc, lines = _deepspeed(recipe, run)
    _wait_for(lines, f"step {first + 1}/40")
    everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    gone, alive = psutil.wait_procs(everyone, timeout=120)
    text = "".join(lines)
    assert not alive, text[-5000:]
    assert time.time() - t0 < 30, "slower than SLURM's KillWait"
    second = _stopped_at(lines)
    assert second > first and "resumed from" in text
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{second:08d}"
    assert "killed by signal" not in text and "Traceback" not in text, text[-5000:]
    assert json.loads((run / "mlflow_run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == list(range(1, second + 1)), steps
