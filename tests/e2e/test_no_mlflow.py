"""The trainer runs without mlflow when tracking is off (`--tracking.enabled False`): the lent GPU
machine has no mlflow and no registry, so bench/gpu_checks.sh runs the trainer that way.

mlflow is made unimportable in the child processes (trainer, DataLoader workers, the figure
process) by a sitecustomize.py first on PYTHONPATH whose import finders no longer find it, as if it
were not installed; then a real one-process DeepSpeed run trains two steps, probes, checkpoints,
evaluates and exports."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import TINY_DATA, child_env, free_port, train

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


def _env(blocker_dir: Path) -> dict:
    # one process without a launcher, as bench/gpu_checks.sh runs it
    return child_env(PYTHONPATH=f"{blocker_dir}{os.pathsep}{REPO}", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                     LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def test_trainer_runs_with_mlflow_unimportable(tmp_path, synth_corpus):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = _env(blocker)
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; assert importlib.util.find_spec('mlflow') "
                            "is None; import mlflow"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'mlflow'" in probe.stderr   # the blocker works

    run = tmp_path / "run"
    p = train(run, synth_corpus, *TINY_DATA, "--train.max-steps", "2", "--train.warmup-steps", "1", "--train.log-every",
              "1", "--train.save-every", "1", "--train.eval-max-new-tokens", "4", "--train.eval-max-samples", "4",
              "--train.eval-untrained", "False", "--train.final-eval-splits", "val", "--monitor.every", "1",
              "--monitor.probe-batch-size", "2", "--tracking.enabled", "False", launcher="python", env=env,
              cwd=tmp_path, timeout=600)
    assert "Traceback" not in p.stderr and "ModuleNotFoundError" not in p.stderr, p.stderr[-4000:]
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 2 and results["val"]["num_utterances"] > 0
    assert (run / "sinks").is_dir() and any((run / "export").iterdir())
    assert not (run / "mlflow.db").exists() and not (run / "mlflow_run.json").exists()
