"""Experiment tracking: MLflow on rank 0, a no-op everywhere else.

The MLflow client is used with an explicit run id (not the fluent global run) so that a resumed
job reattaches to its run. Calls never block training and never raise: they are queued and
delivered by a background courier (trainer/tracking/courier.py) that retries while the
store is down; what it cannot deliver lands in `<run_dir>/tracking/undelivered.jsonl` for replay.
A crash or SIGTERM marks the run FAILED / KILLED; a run left RUNNING by a killed process is marked
FAILED by the next start (trainer/tracking/store.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainer.tracking.courier import (MAX_PARAM_LENGTH, Courier, metric_rows, relative_to_run, replay,
                                             tracking_dir)
from trainer.tracking.store import (TrackingUnreachable, check_reachable, close_stale_run, re_root_artifacts,
                                           store_uri, write_owner)

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
# The MLflow UI opens an experiment with this tag as a model-training experiment (runs, charts),
# not as a GenAI one (traces, evaluations); the values are the UI's ExperimentKind enum.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


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
    """What non-zero ranks get (and rank 0 with tracking off): every call is accepted and ignored."""
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Any, name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_datasets(self, datasets: list[dict]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MLflowTracker(NullTracker):
    def __init__(self, run_dir: str | Path, experiment_name: str | None = None, run_name: str | None = None,
                 tags: dict[str, str] | None = None, description: str | None = None,
                 exit_timeout_s: float = 30.0, max_queue: int = 10000, system_metrics_every_s: float = 0.0):
        from mlflow.tracking import MlflowClient

        # Our courier retries in the background; MLflow's own HTTP retries (7, exponential: minutes)
        # would only hold up the queue behind one request. A user's setting wins.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri, own_store = store_uri(self.run_dir)
        self.own_store = own_store
        if own_store:
            re_root_artifacts(self.run_dir)      # a copied run folder must not write into the original
        # Only the client gets the URI: mlflow.set_tracking_uri would also export it as
        # MLFLOW_TRACKING_URI, and a later tracker in this process would mistake it for the user's.
        self.client = MlflowClient(tracking_uri=self.uri)
        self.exit_timeout_s = exit_timeout_s
        name = experiment_name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "avsr"
        exp_id = self._experiment(name, own_store)
        done, left = replay(self.client, self.run_dir)      # what an earlier attempt could not deliver
        if done or left:
            log.warning("MLflow: replayed %d undelivered ops from an earlier attempt (%d still undelivered)",
                        done, left)
        self.run_id = self._reattach_or_create(exp_id, run_name, tags or {}, description)
        self._last_step = self._logged_steps() if self.resumed else {}
        _forget_artifact_location(self.run_id)
        write_owner(self.run_dir, self.run_id)
        self.courier = Courier(self.client, self.run_dir, max_queue=max_queue,
                               on_idle=lambda: write_owner(self.run_dir, self.run_id))
        self.system = SystemMetrics(self, system_metrics_every_s) if system_metrics_every_s > 0 else None
        log.info("MLflow run %s at %s", self.run_id, self.uri)
        # The 3.x UI opens in its GenAI view unless told (or the browser remembers the toggle).
        page = f"#/experiments/{exp_id}/runs/{self.run_id}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            log.info("MLflow run page: %s/%s", self.uri.rstrip("/"), page)
        else:
            log.info("MLflow UI: `mlflow ui --backend-store-uri %s --port 5000`, then http://127.0.0.1:5000/%s",
                     self.uri, page)

    # ---- setup (synchronous: the store answered the pre-flight check moments ago) -------------------
    def _experiment(self, name: str, own_store: bool) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = (self.run_dir / "mlartifacts").resolve().as_uri() if own_store else None
            exp_id = self.client.create_experiment(name, artifact_location=location,
                                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp_id

    def _reattach_or_create(self, exp_id: str, run_name: str | None, tags: dict[str, str],
                            description: str | None) -> str:
        id_file = self.run_dir / RUN_ID_FILE
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if not run_id and id_file.is_file():
            run_id = json.loads(id_file.read_text()).get("run_id")
        if run_id:
            try:
                close_stale_run(self.client, self.run_dir, run_id)    # left RUNNING by a killed attempt
                self.client.update_run(run_id, status="RUNNING")
                if description:
                    self.client.set_tag(run_id, "avsr.last_attempt", description[:MAX_PARAM_LENGTH])
                self.resumed = True
                return run_id
            except Exception as err:   # a run id from another store: start a new run, say so
                log.warning("cannot reattach to MLflow run %s (%s); starting a new run", run_id, err)
        self.resumed = False
        from mlflow.tracking.context.registry import resolve_tags
        # MLflow's own context: user, source name and type, git commit/branch/repo (what the UI shows)
        all_tags = resolve_tags({**tags, **({"mlflow.note.content": description} if description else {})})
        run = self.client.create_run(exp_id, run_name=run_name, tags=all_tags)
        tmp = id_file.with_suffix(".tmp")
        # The default store is named by the folder itself (relocatable); a user's URI is recorded.
        tmp.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": None if self.own_store else self.uri}))
        os.replace(tmp, id_file)
        return run.info.run_id

    @classmethod
    def attach(cls, run_dir: str | Path, exit_timeout_s: float = 30.0) -> "MLflowTracker":
        """The MLflow run a finished (or stopped) training run logged to, to log more to it later
        (launch/evaluate.py): from MLFLOW_RUN_ID or run_dir/mlflow_run.json. Its status is left as it
        is; call `detach()` when done, which delivers what was queued (or spills it for replay)."""
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        id_file = run_dir / RUN_ID_FILE
        saved = json.loads(id_file.read_text()) if id_file.is_file() else {}
        run_id = os.environ.get("MLFLOW_RUN_ID") or saved.get("run_id")
        if not run_id:
            raise FileNotFoundError(f"no MLflow run recorded for {run_dir} (no {RUN_ID_FILE}: was tracking off?)")
        tracker = cls.__new__(cls)
        tracker.run_dir, tracker.run_id, tracker.resumed = run_dir, run_id, True
        # The run folder's own store wherever the folder now is; else the URI it was logged to.
        tracker.uri, tracker.own_store = store_uri(run_dir)
        if tracker.own_store and not (run_dir / "mlflow.db").is_file() and saved.get("tracking_uri"):
            tracker.uri, tracker.own_store = saved["tracking_uri"], False
        check_reachable(tracker.uri)
        if tracker.own_store:
            re_root_artifacts(run_dir)             # a copied run folder must not write into the original
        tracker.client = MlflowClient(tracking_uri=tracker.uri)
        tracker.client.get_run(run_id)              # a clear MLflow error now if the run is not there
        _forget_artifact_location(run_id)
        tracker.exit_timeout_s, tracker._last_step, tracker.system = exit_timeout_s, {}, None
        tracker.courier = Courier(tracker.client, run_dir)
        return tracker

    def detach(self) -> bool:
        """Deliver what was queued without touching the run's status; True when all was delivered."""
        return self.courier.close(self.exit_timeout_s)

    def _logged_steps(self) -> dict[str, int]:
        """Each metric's last logged step: a resumed attempt does not log again the steps that an
        attempt killed after its last checkpoint already logged (resume is exact: same values)."""
        objs = getattr(self.client.get_run(self.run_id).data, "_metric_objs", [])   # latest value per key
        return {m.key: m.step for m in objs}

    # ---- the calls the trainer makes: queued, never blocking, never raising -------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: ("None" if v is None else str(v))[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()}
        self.courier.put({"op": "params", "run_id": self.run_id, "params": flat})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        rows = [r for r in metric_rows(metrics, step, int(time.time() * 1000))
                if r[3] > self._last_step.get(r[0], -1)]
        if rows:
            self.courier.put({"op": "metrics", "run_id": self.run_id, "rows": rows})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.courier.put({"op": "artifact", "run_id": self.run_id, "path": relative_to_run(path, self.run_dir),
                          "artifact_path": artifact_path})

    def log_dict(self, obj: Any, name: str) -> None:
        self.courier.put({"op": "text", "run_id": self.run_id, "text": json.dumps(obj, indent=2, default=str),
                          "artifact_file": name})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.courier.put({"op": "tags", "run_id": self.run_id,
                          "tags": {k: str(v)[:MAX_PARAM_LENGTH] for k, v in tags.items()}})

    def log_datasets(self, datasets: list[dict]) -> None:
        """Dataset inputs (see `shard_datasets`): the run page's Datasets column and panel."""
        if datasets:
            self.courier.put({"op": "inputs", "run_id": self.run_id, "datasets": datasets})

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait for the queued ops to be delivered (tests, tools); True when all were."""
        return self.courier.flush(timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        if self.system is not None:
            self.system.stop()
        self.courier.put({"op": "terminate", "run_id": self.run_id, "status": status,
                          "end_time": int(time.time() * 1000)})
        all_delivered = self.courier.close(self.exit_timeout_s)
        try:
            write_owner(self.run_dir, self.run_id, ended=status)
        except OSError as err:       # a full disk: the next start treats the run as not ended, which is safe
            log.warning("MLflow: could not record the run's end in %s (%s)", self.run_dir / "tracking", err)
        if self.courier.spill.dropped:
            log.error("MLflow: %d tracking ops (the run's end state %s among them, if it was not delivered) were "
                      "dropped: neither the store nor %s had room", self.courier.spill.dropped, status,
                      self.courier.spill.path)
        elif not all_delivered:
            log.error("MLflow: %d tracking ops (the run's end state %s among them) were not delivered; they are "
                      "in %s and are delivered by the next start of this run folder or by "
                      "`python launch/replay_tracking.py --run-dir %s`", self.courier.spill.count, status,
                      self.courier.spill.path, self.run_dir)


def _forget_artifact_location(run_id: str) -> None:
    """MLflow caches each run's artifact location per process; a run folder copied and resumed in the
    same process (tools, tests) must not reuse the original's."""
    try:
        from mlflow.tracking._tracking_service import utils
        utils._artifact_repos_cache.pop(run_id, None)
    except (ImportError, AttributeError):     # another MLflow version: no such cache
        pass


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network, GPU via pynvml), sampled by MLflow's own
    monitors in a thread and logged through the tracker's queue, so a store outage neither stops
    them nor stalls training. Rank 0's machine only. Cost: one psutil sample (~1 ms) and one small
    metrics batch per interval."""

    def __init__(self, tracker: MLflowTracker, every_s: float):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor   # needs psutil
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
            self.monitors.append(GPUMonitor())
        except Exception:                  # no NVIDIA GPU or no pynvml: CPU-side metrics only
            pass
        self.tracker, self.every_s = tracker, every_s
        self.step = 1 + max((s for k, s in tracker._last_step.items() if k.startswith("system/")), default=-1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            metrics: dict[str, float] = {}
            for m in self.monitors:
                try:
                    m.collect_metrics()
                    metrics.update(m.aggregate_metrics())
                    m.clear_metrics()
                except Exception as err:
                    log.debug("system metrics: %s failed: %s", type(m).__name__, err)
            self.tracker.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self.step)
            self.step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


def system_metrics_available() -> bool:
    try:
        import psutil  # noqa: F401
        return True
    except ImportError:
        return False


# ---- what the run page shows besides metrics ----------------------------------------------------------
def describe_run(cfg: dict, world_size: int, argv: list[str] | None = None) -> str:
    """The run's description (MLflow's `mlflow.note.content`, markdown): the command and a config summary."""
    args = [a for a in (sys.argv if argv is None else argv) if not a.startswith("--local_rank")]
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    llm = m.get("llm_path") or "tiny LLM built in code"
    lines = [
        f"**Command** ({world_size} processes):", "", "```", *_wrapped_command(["launch/train.py", *args[1:]]),
        "```", "",
        f"- modality **{m.get('modality')}**; LLM: {llm}; DeepSpeed config: {Path(cfg['config']).name}",
        f"- decorrelation weight {m.get('decorrelation_weight')}; "
        f"audio/video rates {m.get('audio_rate', '?')}/{m.get('video_rate', '?')}",
        f"- {t['max_steps']} steps, lr {t['lr']}, grad accum {t['grad_accum']}, "
        f"batch <= {d.get('max_batch_size')} clips / {d.get('max_frames_per_batch')} frames per rank",
        f"- data: {d['shard_dir']} (train {d['train_split']}, eval {d['eval_split']}, test {d['test_split']})",
        f"- run folder: {Path(t['run_dir']).name}; recipe: {cfg.get('recipe') or 'none'}",
    ]
    return "\n".join(lines)


def _wrapped_command(args: list[str], width: int = 88) -> list[str]:
    """Shell lines with backslash continuations, an option and its value never split (the UI shows
    the description's code block unwrapped: one long line would push the run details off screen)."""
    words, i = [], 0
    while i < len(args):
        take = 2 if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--") else 1
        words.append(shlex.join(args[i:i + take]))
        i += take
    lines, line = [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line + " \\")
            line = "    " + w
        else:
            line = f"{line} {w}" if line else w
    return lines + [line]


def shard_datasets(data_cfg) -> list[dict]:
    """One MLflow dataset input per split the run reads: name, a digest of its shard index, the
    index's location, and a profile with rows (utterances), shards and hours."""
    from trainer.data.shard_format import index_path, load_index
    out = []
    for context, split in (("training", data_cfg.train_split), ("validation", data_cfg.eval_split),
                           ("testing", data_cfg.test_split)):
        path = index_path(data_cfg.shard_dir, split)
        if not path.is_file():
            continue
        idx = load_index(data_cfg.shard_dir, split)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        profile = {"num_rows": idx.num_samples, "num_shards": len(idx.shards),
                   "hours": round(idx.duration / 3600, 3)}
        source = json.dumps({"uri": str(path.resolve())})
        out.append({"dataset": {"name": f"{Path(data_cfg.shard_dir).name}/{split}", "digest": digest,
                                "source_type": "local", "source": source, "profile": json.dumps(profile)},
                    "tags": {"mlflow.data.context": context}})
    return out


# ---- start-up ------------------------------------------------------------------------------------------
def preflight(tracking_cfg, run_dir: str | Path) -> bool:
    """Before any process group starts (rank 0): is tracking on, and does its store answer?
    An unreachable store is one clear error, or with `--tracking.on-unreachable continue` a run
    without tracking. Returns whether to track."""
    if not tracking_cfg.enabled:
        return False
    uri, _ = store_uri(run_dir)
    try:
        check_reachable(uri, tracking_cfg.connect_timeout_s)
    except TrackingUnreachable as err:
        if tracking_cfg.on_unreachable == "continue":
            log.error("%s; training continues WITHOUT tracking (--tracking.on-unreachable continue)", err)
            return False
        raise SystemExit(f"error: {err}. Start the server or point MLFLOW_TRACKING_URI at one that answers; "
                         f"or train without MLflow: --tracking.enabled False (or --tracking.on-unreachable "
                         f"continue to go on untracked when the store is down)") from None
    return True


def make_tracker(rank: int, run_dir: str | Path, enabled: bool = True, **kwargs) -> NullTracker:
    return MLflowTracker(run_dir, **kwargs) if (enabled and rank == 0) else NullTracker()


def tracker_for_run(rank: int, run_dir: str | Path, tracking_cfg, description: str | None = None) -> NullTracker:
    """The trainer's tracker, from its config (`--tracking.*`)."""
    every = tracking_cfg.system_metrics_every_s
    if rank == 0 and tracking_cfg.enabled and every and not system_metrics_available():
        log.info("MLflow system metrics off: psutil is not installed")
        every = 0.0
    try:
        return make_tracker(rank, run_dir, enabled=tracking_cfg.enabled, experiment_name=tracking_cfg.experiment,
                            run_name=tracking_cfg.run_name or Path(run_dir).name, description=description,
                            exit_timeout_s=tracking_cfg.exit_timeout_s, max_queue=tracking_cfg.max_queue,
                            system_metrics_every_s=every)
    except Exception as err:     # the store went away between the pre-flight check and here
        if tracking_cfg.on_unreachable == "continue":
            log.error("MLflow unusable at start (%s: %s); training continues WITHOUT tracking", type(err).__name__, err)
            return NullTracker()
        raise RuntimeError(f"MLflow unusable at start ({type(err).__name__}: {err}); train without it with "
                           f"--tracking.enabled False or --tracking.on-unreachable continue") from err


__all__ = ["MLflowTracker", "NullTracker", "make_tracker", "tracker_for_run", "preflight", "flatten", "describe_run",
           "shard_datasets", "tracking_dir", "system_metrics_available"]
