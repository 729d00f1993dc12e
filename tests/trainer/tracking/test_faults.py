"""MLflow tracking under real faults: a real `mlflow server` stopped by PID and restarted, another
process holding an exclusive sqlite lock on mlflow.db, nothing listening at start, a tracking process
killed with SIGKILL, a run folder copied and resumed. Training-side calls must never block or raise;
everything must reach the store once it answers (or by replay), each metric step exactly once."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import child_env, free_port
from trainer.tracking.config import TrackingConfig
from trainer.tracking.tracker import MLflowTracker, preflight
from trainer.tracking.courier import SPILL_NAME
from trainer.tracking.store import TrackingUnreachable, check_reachable

FAST = 0.5     # a tracking call from the training loop returns within this, whatever the store does


@pytest.fixture
def no_mlflow_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)


def _log_steps(tr: MLflowTracker, steps) -> None:
    for step in steps:
        t0 = time.monotonic()
        tr.log_metrics({"train/loss": 10.0 - step, "train/lr": 1e-3}, step)
        assert time.monotonic() - t0 < FAST, f"log_metrics blocked at step {step}"


def _steps(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


class MlflowServer:
    """A real `mlflow server` on a fixed port and store, started and stopped by PID."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=child_env(), stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "server.log", "a"), start_new_session=True)
        deadline = time.monotonic() + 240          # ~6 s on an idle machine; minutes on a loaded one
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    self.stop()
                    raise AssertionError((self.root / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        self.stop()                                    # never leave a server behind
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)     # its workers too: the port must come free
            self.proc.wait(30)
        self.proc = None


@pytest.fixture
def server(tmp_path, monkeypatch):
    root = tmp_path / "server"
    root.mkdir()
    srv = MlflowServer(root)
    srv.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_server_stopped_mid_run_then_restarted_loses_nothing(server, tmp_path):
    run_dir = tmp_path / "run"
    tr = MLflowTracker(run_dir, experiment_name="outage", run_name="r", exit_timeout_s=60)
    tr.log_params({"train": {"lr": 0.1}})
    _log_steps(tr, range(1, 6))
    assert tr.flush(30)
    server.stop()                                   # the store goes away mid-run
    _log_steps(tr, range(6, 16))                   # training goes on: calls return at once
    (tmp_path / "late.json").write_text("{}")
    tr.log_artifact(tmp_path / "late.json", "config")
    time.sleep(2)
    assert tr.courier.failing_since is not None    # the courier saw the outage and is retrying
    server.start()                                  # same port, same store
    tr.finish("FINISHED")                           # waits (bounded) until the store has everything
    from mlflow.tracking import MlflowClient
    client = MlflowClient(server.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert _steps(client, tr.run_id) == list(range(1, 16))
    assert run.data.params["train.lr"] == "0.1"
    assert [a.path for a in client.list_artifacts(tr.run_id, "config")] == ["config/late.json"]
    assert not (run_dir / "tracking" / SPILL_NAME).exists()


@pytest.mark.slow
def test_store_down_at_exit_is_written_to_the_run_folder_and_replayed(server, tmp_path):
    run_dir = tmp_path / "run"
    tr = MLflowTracker(run_dir, experiment_name="exit", exit_timeout_s=2)
    _log_steps(tr, range(1, 4))
    assert tr.flush(30)
    server.stop()
    _log_steps(tr, range(4, 8))
    t0 = time.monotonic()
    tr.finish("KILLED")                            # bounded wait, then the rest goes to the run folder
    assert time.monotonic() - t0 < 2 + 25          # exit timeout + at most one HTTP timeout in flight
    spilled = [json.loads(line) for line in (run_dir / "tracking" / SPILL_NAME).read_text().splitlines()]
    assert spilled[-1]["op"] == "terminate" and spilled[-1]["status"] == "KILLED"

    replay = [sys.executable, str(REPO / "launch" / "replay_tracking.py"), "--run-dir", str(run_dir)]
    down = subprocess.run(replay + ["--timeout", "2"], env=child_env(MLFLOW_TRACKING_URI=server.uri), capture_output=True, text=True)
    assert down.returncode == 1 and "does not answer" in down.stderr, down.stderr
    server.start()
    for _ in range(2):                              # replaying twice delivers each value once
        ok = subprocess.run(replay, env=child_env(MLFLOW_TRACKING_URI=server.uri), capture_output=True, text=True)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    from mlflow.tracking import MlflowClient
    client = MlflowClient(server.uri)
    assert client.get_run(tr.run_id).info.status == "KILLED"
    assert _steps(client, tr.run_id) == list(range(1, 8))
    assert not (run_dir / "tracking" / SPILL_NAME).exists()


@pytest.mark.slow
def test_sqlite_store_locked_mid_run(tmp_path, no_mlflow_env):
    run_dir = tmp_path / "run"
    tr = MLflowTracker(run_dir, experiment_name="locked")
    _log_steps(tr, range(1, 4))
    assert tr.flush(30)
    # Another process takes an exclusive lock for longer than MLflow's sqlite busy timeout (20 s).
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys, time
        c = sqlite3.connect({str(run_dir / 'mlflow.db')!r}, isolation_level=None)
        c.execute("BEGIN EXCLUSIVE")
        print("locked", flush=True)
        time.sleep(24)
        c.execute("ROLLBACK")
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(TrackingUnreachable, match="lock"):     # a start now would say so in seconds
            check_reachable(f"sqlite:///{run_dir / 'mlflow.db'}", timeout_s=2)
        assert time.monotonic() - t0 < 10
        for step in range(4, 12):                                   # steps go on while it is locked
            _log_steps(tr, [step])
            time.sleep(0.5)
        tr.set_tags({"note": "logged under the lock"})
    finally:
        holder.wait(60)
    tr.finish("FINISHED")
    run = tr.client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["note"] == "logged under the lock"
    assert _steps(tr.client, tr.run_id) == list(range(1, 12))
    assert tr.courier.retries > 0, "the lock was never hit: the test did not test the fault"


def test_unreachable_server_at_start_is_one_clear_error_in_seconds(tmp_path):
    port = free_port()                                            # nothing listens there
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--train.run-dir", str(run_dir),
                        "--tracking.connect-timeout-s", "4"],
                       env=child_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"), capture_output=True, text=True,
                       timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    assert "--tracking.enabled False" in p.stderr and "does not answer" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert elapsed < 30, elapsed                                   # imports + 4 s of tries, not minutes
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "mlflow_run.json").exists()


def test_unreachable_server_with_continue_trains_untracked(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    cfg = TrackingConfig(on_unreachable="continue", connect_timeout_s=2)
    assert preflight(cfg, tmp_path) is False
    assert "WITHOUT tracking" in caplog.text
    assert preflight(TrackingConfig(enabled=False), tmp_path) is False
    with pytest.raises(SystemExit, match="--tracking.enabled False"):
        preflight(TrackingConfig(connect_timeout_s=2), tmp_path)


_KILLED_OWNER = """
import os, signal, sys
from trainer.tracking.tracker import MLflowTracker
tr = MLflowTracker(sys.argv[1], experiment_name="k9")
for step in range(1, 6):
    tr.log_metrics({"train/loss": 10.0 - step}, step)
assert tr.flush(60)
print(tr.run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_kill9_of_the_tracking_process_leaves_no_run_running(tmp_path, no_mlflow_env):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _KILLED_OWNER, str(run_dir)], env=child_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    run_id = p.stdout.split()[0]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "RUNNING"          # what kill -9 leaves behind

    # The replay tool (or the next start) notices that the owner is gone: FAILED, ended at its heartbeat.
    out = subprocess.run([sys.executable, str(REPO / "launch" / "replay_tracking.py"), "--run-dir", str(run_dir)],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "gone" in run.data.tags["avsr.closed_as_stale"]

    # The resumed attempt (checkpoint at step 3) logs steps 4.. again: each step stays in the history once.
    tr = MLflowTracker(run_dir, experiment_name="k9")
    assert tr.run_id == run_id and tr.resumed
    _log_steps(tr, range(4, 9))
    tr.finish("FINISHED")
    hist = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, 9))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_next_start_closes_a_run_left_running(tmp_path, no_mlflow_env):
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _KILLED_OWNER, str(run_dir)], env=child_env(), capture_output=True,
                       text=True, timeout=300)
    run_id = p.stdout.split()[0]
    tr = MLflowTracker(run_dir, experiment_name="k9")              # the resume, with no tool run in between
    tags = tr.client.get_run(run_id).data.tags
    assert "avsr.closed_as_stale" in tags and tr.client.get_run(run_id).info.status == "RUNNING"
    tr.finish("FINISHED")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_run_folder_never_writes_into_the_original(tmp_path, no_mlflow_env):
    import shutil
    original, copy = tmp_path / "base", tmp_path / "elsewhere" / "copy"
    (tmp_path / "a.json").write_text('{"a": 1}')
    tr = MLflowTracker(original, experiment_name="reloc")
    tr.log_metrics({"train/loss": 1.0}, 1)
    tr.log_artifact(tmp_path / "a.json", "config")
    tr.finish("KILLED")
    shutil.copytree(original, copy)
    before = _snapshot(original)

    again = MLflowTracker(copy, experiment_name="reloc")           # resume the copy
    assert again.run_id == tr.run_id
    (tmp_path / "b.json").write_text('{"b": 2}')
    again.log_artifact(tmp_path / "a.json", "config")              # the same artefact again, and a new one
    again.log_artifact(tmp_path / "b.json", "config")
    again.log_metrics({"train/loss": 0.5}, 2)
    again.finish("FINISHED")
    assert _snapshot(original) == before, "resuming the copy changed the original run folder"
    assert {p.name for p in (copy / "mlartifacts").rglob("*.json")} == {"a.json", "b.json"}
    assert again.client.get_run(again.run_id).info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
