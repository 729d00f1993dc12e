"""The trainer runs without mlflow when tracking is off (`--tracking.enabled False`): the lent GPU
machine has no mlflow and no registry, so bench/gpu_checks.sh runs the trainer that way.

mlflow is made unimportable in the child processes (trainer, DataLoader workers, the figure
process) by a sitecustomize.py first on PYTHONPATH whose import finders no longer find it, as if it
were not installed; then a real one-process DeepSpeed run trains two steps, probes, checkpoints,
evaluates and exports."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.constants import REPO

pytestmark = pytest.mark.slow

BLOCKER = textwrap.dedent("""\
    # mlflow looks uninstalled: every finder answers None for it (importlib.util.find_spec -> None,
    # import -> ModuleNotFoundError), as accelerate's and transformers' availability checks expect.
    import sys

    class _WithoutMlflow:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name == "mlflow" or name.startswith("mlflow."):
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [_WithoutMlflow(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(blocker_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{blocker_dir}{os.pathsep}{REPO}",
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return env


def test_trainer_runs_with_mlflow_unimportable(tmp_path, synth_corpus):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = _env(blocker)
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; assert importlib.util.find_spec('mlflow') "
                            "is None; import mlflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'mlflow'" in probe.stderr   # the blocker works

    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
           "--data.shard-dir", str(synth_corpus), "--data.num-workers", "1", "--train.device", "cpu",
           "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4", "--data.batches-per-epoch", "4",
           "--train.run-dir", str(run), "--train.max-steps", "2", "--train.warmup-steps", "1",
           "--train.log-every", "1", "--train.save-every", "1", "--train.eval-max-new-tokens", "4",
           "--train.eval-max-samples", "4", "--train.eval-untrained", "False", "--train.test-at-end", "False",
           "--monitor.every", "1", "--monitor.probe-batch-size", "2", "--tracking.enabled", "False"]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    assert "Traceback" not in p.stderr and "ModuleNotFoundError" not in p.stderr, p.stderr[-4000:]
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 2 and results["val"]["num_utterances"] > 0
    assert (run / "sinks").is_dir() and any((run / "export").iterdir())
    assert not (run / "mlflow.db").exists() and not (run / "mlflow_run.json").exists()
