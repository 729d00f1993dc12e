"""Experiment tracking: MLflow on rank 0, a no-op everywhere else.

The MLflow client is used with an explicit run id (not the fluent global run) so
that a resumed job reattaches to its run, and a crash or SIGTERM marks the run
FAILED / KILLED instead of leaving it RUNNING forever.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# MLflow's REST limits (per log_batch request); values longer than the param limit are cut.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
RUN_ID_FILE = "mlflow_run.json"


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts/lists -> {"a.b.0": value}; used for config params."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
    elif isinstance(tree, (list, tuple)) and tree and all(isinstance(v, (dict, list, tuple)) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{sep}{i}", sep))
    else:
        out[prefix] = tree
    return out


class NullTracker:
    """What non-zero ranks get: every call is accepted and ignored."""
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MLflowTracker(NullTracker):
    def __init__(self, run_dir: str | Path, experiment_name: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Only the client gets the URI: mlflow.set_tracking_uri would also export it as
        # MLFLOW_TRACKING_URI, and a later tracker in this process would mistake it for the user's.
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        uri = user_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "avsr"
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None if user_uri else \
                (self.run_dir / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.run_id = self._reattach_or_create(exp_id, run_name, tags or {})
        log.info("MLflow run %s at %s", self.run_id, uri)

    def _reattach_or_create(self, exp_id: str, run_name: str | None, tags: dict[str, str]) -> str:
        id_file = self.run_dir / RUN_ID_FILE
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if not run_id and id_file.is_file():
            run_id = json.loads(id_file.read_text()).get("run_id")
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.resumed = True
                return run_id
            except Exception as err:   # a run id from another store: start a new run, say so
                log.warning("cannot reattach to MLflow run %s (%s); starting a new run", run_id, err)
        self.resumed = False
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": self.uri}))
        os.replace(tmp, id_file)
        return run.info.run_id

    @classmethod
    def attach(cls, run_dir: str | Path) -> "MLflowTracker":
        """The MLflow run a finished (or stopped) training run logged to, to log more to it later
        (launch/evaluate.py): from MLFLOW_RUN_ID or run_dir/mlflow_run.json; its status is left as it is."""
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        saved = json.loads(id_file.read_text()) if id_file.is_file() else {}
        run_id = os.environ.get("MLFLOW_RUN_ID") or saved.get("run_id")
        if not run_id:
            raise FileNotFoundError(f"no MLflow run recorded for {run_dir} (no {RUN_ID_FILE}: was tracking off?)")
        local = run_dir / "mlflow.db"
        tracker = cls.__new__(cls)
        tracker.run_dir, tracker.run_id, tracker.resumed = run_dir, run_id, True
        # The run folder's own store wherever the folder now is; else the URI it was logged to.
        tracker.uri = os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{local.resolve()}" if local.is_file() else saved.get("tracking_uri"))
        tracker.client = MlflowClient(tracking_uri=tracker.uri)
        tracker.client.get_run(run_id)              # a clear MLflow error now if the run is not there
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        flat = {k: ("None" if v is None else str(v))[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}
        existing = self.client.get_run(self.run_id).data.params
        changed = {k: (existing[k], v) for k, v in flat.items() if k in existing and existing[k] != v}
        if changed:   # MLflow params are immutable: keep the first value, record the new one as a tag
            log.warning("params changed on resume (kept as tags 'resume.<key>'): %s", sorted(changed))
            for k, (_, v) in changed.items():
                self.client.set_tag(self.run_id, f"resume.{k}", v[:MAX_PARAM_LENGTH])
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for batch in _chunks(new, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if v is not None and math.isfinite(float(v))]
        for batch in _chunks(rows, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:     # never let tracking hide the real error
            log.error("could not mark MLflow run %s as %s: %s", self.run_id, status, err)


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def make_tracker(rank: int, run_dir: str | Path, enabled: bool = True, **kwargs) -> NullTracker:
    return MLflowTracker(run_dir, **kwargs) if (enabled and rank == 0) else NullTracker()
