"""A full disk, for real: a 40 MB tmpfs (needs root to mount) under the run folder, shard cache and MLflow store.

- checkpoints/ fills during the second save of a 2-process ZeRO-3 run: the run ends with exit 1 and one
  `error: disk full: ...` line naming the file, the room there was and the room the save needed, that the
  previous checkpoint is intact and the same command resumes there; no rank prints a traceback; the
  warning that the next checkpoint will not fit came first; MLflow has the run FAILED with the line; the
  unfinished folder is set aside. The folder copied to a disk with room resumes and finishes.
- the shard cache on a full disk: the shard is still read whole, the cache evicts, one warning.
"""
import io
import json
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import TINY_DATA, child_env, train

ARGS = [*TINY_DATA, "--train.max-steps", "6", "--train.log-every", "1",
        "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "2", "--train.final-eval-splits",
        "--train.eval-untrained", "False", "--train.export-on-finish", "False", "--monitor.every", "0"]


@contextmanager
def small_disk(path: Path, size: str = "40m"):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _train(run_dir: Path, corpus: Path, mlflow_db: Path) -> subprocess.CompletedProcess:
    env = child_env(DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}",
                    MLFLOW_EXPERIMENT_NAME="disk-full")
    return train(run_dir, corpus, *ARGS, env=env, ok=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes_elsewhere(tmp_path, synth_corpus):
    db = tmp_path / "mlflow.db"                    # the store on a disk with room: FAILED gets recorded
    with small_disk(tmp_path / "small") as disk:
        run = disk / "run"
        p = _train(run, synth_corpus, db)
        out = p.stdout + p.stderr
        assert p.returncode != 0, out[-4000:]
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, out[-6000:]
        line = errors[0]
        assert re.search(r"error: disk full: checkpoint step_00000004 could not be written \(.*step_00000004/\S+\); "
                         r"[\d.]+ MB were free under .* when the save began and the save needs about [\d.]+ MB "
                         r"\(the size of step_00000002\); the previous checkpoint step_00000002 is intact and the "
                         r"same command resumes there once there is room", line), line
        # no rank's traceback: the only one allowed is torchrun's own report that a child exited 1
        assert out.count("Traceback") <= out.count("ChildFailedError:"), out[-6000:]
        assert "the next checkpoint will not fit" in out
        ck = run / "checkpoints"
        assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002"]
        assert (ck / "latest").read_text().strip() == "step_00000002"
        assert [p.name for p in ck.glob("set_aside/*-save-failed/step_00000004")] == ["step_00000004"]
        moved = tmp_path / "moved"
        shutil.copytree(run, moved, ignore=shutil.ignore_patterns("set_aside"))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = json.loads((moved / "mlflow_run.json").read_text())["run_id"]
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure"] == line.removeprefix("error: ")
    p = _train(moved, synth_corpus, db)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "step_00000002 at step 2" in out
    assert sorted(int(m) for m in re.findall(r"step (\d+)/6 loss", out)) == [3, 4, 5, 6]


def test_a_full_shard_cache_evicts_and_reads_on(tmp_path, caplog):
    from trainer.data.cache import ShardCache
    payload = os.urandom(3 << 20)
    with small_disk(tmp_path / "cache", "2m") as disk:
        (disk / "old-entry").write_bytes(os.urandom(1 << 20))       # a cached shard from before
        cache = ShardCache(disk, max_bytes=100 << 20)
        for url in ("http://x/a.tar", "http://x/b.tar"):
            with caplog.at_level("WARNING"):
                with cache.tee(url, io.BytesIO(payload)) as tee:
                    assert tee.read() == payload                       # the reader got every byte
        assert cache.lookup("http://x/a.tar") is None and cache.lookup("http://x/b.tar") is None
        assert not any(p.name.startswith(".part-") for p in disk.iterdir())
        assert not (disk / "old-entry").exists()                      # evicted to make room
    full = [r for r in caplog.records if "shard cache" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in full]
    assert "full" in full[0].getMessage() and "reading on without caching" in full[0].getMessage()


@pytest.mark.slow          # ~30 s, most of it creating MLflow's store
def test_a_full_mlflow_store_stops_tracking_not_training(tmp_path, caplog, monkeypatch):
    """The run folder's own MLflow store (mlflow.db) and its spill file on a disk that fills after the start:
    every tracking call returns, finish() returns, and each of the two problems is said once."""
    from trainer.tracking.tracker import MLflowTracker
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with small_disk(tmp_path / "store", "20m") as disk:
        tracker = MLflowTracker(disk / "run", experiment_name="full", exit_timeout_s=3.0, max_queue=4)
        tracker.log_metrics({"train/loss": 1.0}, 1)
        assert tracker.flush(30)
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        with caplog.at_level("WARNING"):
            for step in range(2, 40):
                tracker.log_metrics({"train/loss": 1.0 / step}, step)
            tracker.finish("FINISHED")
    said = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert sum("training continues" in m for m in said) == 1, said
    assert sum("could not be kept" in m for m in said) == 1, said
    assert any("dropped" in m for m in said), said
