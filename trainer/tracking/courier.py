"""Delivery of tracking calls to MLflow, off the training thread.

Every tracker call becomes an *op*: a small JSON-able dict that names the run it belongs to.
A background thread delivers ops in order and retries failures with backoff, so a tracking
store that is down, slow or locked never stops training. The queue is bounded; when it is full
(or the run ends before the store answers again) ops are appended to
`<run_dir>/tracking/undelivered.jsonl`, which the next start of the run folder or
`python launch/replay_tracking.py --run-dir R` delivers. Replay skips metric values that are
already stored, so replaying twice (or an op that was half delivered) never duplicates a value.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000     # MLflow's limits per log_batch request
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
SPILL_NAME = "undelivered.jsonl"
REJECTED_NAME = "rejected.jsonl"


def tracking_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tracking"


# ---- ops -------------------------------------------------------------------------------------------
def deliver(client, op: dict, run_dir: Path) -> None:
    """Perform one op with an MlflowClient. Raises what the client raises."""
    from mlflow.entities import Metric, Param, RunTag

    kind, run_id = op["op"], op["run_id"]
    if kind == "metrics":
        rows = [Metric(k, v, ts, step) for k, v, ts, step in op["rows"]]
        for batch in _chunks(rows, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch)
    elif kind == "params":
        existing = client.get_run(run_id).data.params
        changed = {k: v for k, v in op["params"].items() if k in existing and existing[k] != v}
        if changed:   # MLflow params are immutable: keep the first value, record the new one as a tag
            log.warning("params changed on resume (kept as tags 'resume.<key>'): %s", sorted(changed))
            tags = [RunTag(f"resume.{k}", v[:MAX_PARAM_LENGTH]) for k, v in changed.items()]
            for batch in _chunks(tags, MAX_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=batch)
        new = [Param(k, v) for k, v in op["params"].items() if k not in existing]
        for batch in _chunks(new, MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch)
    elif kind == "tags":
        tags = [RunTag(k, v) for k, v in op["tags"].items()]
        for batch in _chunks(tags, MAX_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=batch)
    elif kind == "artifact":
        path = _resolve(op["path"], run_dir)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} no longer exists")
        if path.is_dir():
            client.log_artifacts(run_id, str(path), op.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "text":
        client.log_text(run_id, op["text"], op["artifact_file"])
    elif kind == "inputs":
        from mlflow.entities import Dataset, DatasetInput, InputTag
        inputs = [DatasetInput(Dataset(**d["dataset"]), tags=[InputTag(k, v) for k, v in d["tags"].items()])
                  for d in op["datasets"]]
        client.log_inputs(run_id, datasets=inputs)
    elif kind == "terminate":
        client.set_terminated(run_id, status=op["status"], end_time=op["end_time"])
    else:
        raise ValueError(f"unknown tracking op {kind!r}")


def _resolve(path: str, run_dir: Path) -> Path:
    """Artifact paths inside the run folder are stored relative to it, so a moved folder replays."""
    p = Path(path)
    return p if p.is_absolute() else run_dir / p


def relative_to_run(path: str | Path, run_dir: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: the store is unreachable, slow, overloaded or locked. Anything else (a
    rejected value, a deleted run) would fail the same way forever."""
    from mlflow.exceptions import MlflowException
    if isinstance(err, (ConnectionError, TimeoutError, OSError)) and not isinstance(err, FileNotFoundError):
        return True
    if isinstance(err, MlflowException):
        code = getattr(err, "error_code", "")
        text = str(err).lower()
        if code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"):
            return True
        return any(s in text for s in ("database is locked", "max retries", "connection", "timed out",
                                       "temporarily", "503", "502", "504"))
    name = type(err).__name__
    return name in ("OperationalError", "ConnectionError", "ReadTimeout", "ConnectTimeout", "MaxRetryError") \
        or "database is locked" in str(err).lower()


# ---- the spill file -------------------------------------------------------------------------------
class SpillFile:
    """Append-only JSONL of ops not delivered; shared by the training thread and the courier."""

    def __init__(self, run_dir: Path, name: str = SPILL_NAME):
        self.path = tracking_dir(run_dir) / name
        self._lock = threading.Lock()
        self.count = 0
        self.dropped = 0

    def write(self, ops: Iterable[dict], reason: str = "") -> None:
        ops = list(ops)
        if not ops:
            return
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    for op in ops:
                        f.write(json.dumps({**op, "reason": reason} if reason else op) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as err:          # a full disk: tracking stops here, training must not
                if not self.dropped:
                    log.error("MLflow: tracking ops could not be kept in %s either (%s): from now on what the store "
                              "does not take is dropped; training goes on (said once)", self.path, err.strerror or err)
                self.dropped += len(ops)
                return
            self.count += len(ops)


def read_ops(path: Path) -> list[dict]:
    ops = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:     # a line cut by a crash mid-write: the rest still replays
            log.warning("%s line %d is not JSON (cut by a crash?); skipped", path, n)
    return ops


# ---- the background courier -----------------------------------------------------------------------
class Courier:
    """One thread that delivers ops in order, retrying transient failures with backoff (1 s doubling
    to `max_backoff_s`) for as long as the run lasts. `put` never blocks: with `max_queue` ops
    waiting, further ops go straight to the spill file (nothing is dropped)."""

    def __init__(self, client, run_dir: Path, max_queue: int = 10000, max_backoff_s: float = 30.0,
                 on_idle: Callable[[], None] | None = None, idle_every_s: float = 15.0):
        self.client, self.run_dir = client, Path(run_dir)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.spill = SpillFile(self.run_dir)
        self.rejected = SpillFile(self.run_dir, REJECTED_NAME)
        self.max_backoff_s = max_backoff_s
        self.on_idle, self.idle_every_s = on_idle, idle_every_s
        self.delivered = 0
        self.retries = 0                 # transient failures seen (each one retried)
        self.failing_since: float | None = None
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._deadline = float("inf")
        self._in_flight: dict | None = None
        self._warned_full = False
        self._last_beat = 0.0
        self._thread = threading.Thread(target=self._run, name="mlflow-courier", daemon=True)
        self._thread.start()

    def put(self, op: dict) -> None:
        if self._closing.is_set():
            self.spill.write([op], "after close")
            return
        try:
            self.queue.put_nowait(op)
        except queue.Full:
            if not self._warned_full:
                self._warned_full = True
                log.warning("MLflow queue full (%d ops waiting: the store has not answered for %.0f s); "
                            "writing further ops to %s (replayed on the next start of this run folder, or by "
                            "`python launch/replay_tracking.py --run-dir %s`)", self.queue.maxsize,
                            time.monotonic() - (self.failing_since or time.monotonic()), self.spill.path,
                            self.run_dir)
            self.spill.write([op], "queue full")

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued op is handled (delivered or set aside); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.queue.unfinished_tasks

    def close(self, timeout_s: float) -> bool:
        """Deliver what is queued within `timeout_s`; spill the rest. True when everything was delivered."""
        self._deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s + 1.0)
        left: list[dict] = []
        if self._thread.is_alive():          # stuck in a slow call: spill that op too (replay dedups)
            if self._in_flight is not None:
                left.append(self._in_flight)
        left.extend(self._drain())
        if left:
            self.spill.write(left, "store unreachable at exit")
        return not left and self.spill.count == 0

    def _drain(self) -> list[dict]:
        ops = []
        while True:
            try:
                ops.append(self.queue.get_nowait())
            except queue.Empty:
                return ops

    def _beat(self) -> None:
        """The owner's heartbeat (every `idle_every_s`), also while an outage is being retried."""
        if self.on_idle is not None and time.monotonic() - self._last_beat >= self.idle_every_s:
            self._last_beat = time.monotonic()
            try:
                self.on_idle()
            except Exception as err:              # the heartbeat must not kill delivery
                log.debug("tracking heartbeat failed: %s", err)

    def _run(self) -> None:
        while True:
            self._beat()
            try:
                op = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            self._in_flight = op
            delivered = self._deliver_with_retry(op)
            self._in_flight = None
            self.queue.task_done()
            if not delivered:                        # out of time at exit: the caller spills the rest
                self.spill.write([op], "store unreachable at exit")
                return

    def _deliver_with_retry(self, op: dict) -> bool:
        backoff = 1.0
        while True:
            try:
                deliver(self.client, op, self.run_dir)
                if self.failing_since is not None:
                    log.warning("MLflow store answers again after %.0f s; delivering the %d buffered ops",
                                time.monotonic() - self.failing_since, self.queue.qsize())
                    self.failing_since = None
                self.delivered += 1
                return True
            except Exception as err:
                if not is_transient(err):
                    log.error("MLflow rejected a %s op (%s: %s); kept in %s", op["op"], type(err).__name__,
                              err, self.rejected.path)
                    self.rejected.write([op], f"{type(err).__name__}: {err}"[:500])
                    return True
                self.retries += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    first = str(err).splitlines()[0][:200] if str(err) else ""
                    full = any(t in str(err).lower() for t in ("disk is full", "no space left"))
                    log.warning("MLflow store %s (%s: %s); training continues, ops are buffered and retried (spilled "
                                "to %s when the queue fills)", "out of disk space" if full else "not answering",
                                type(err).__name__, first, self.spill.path)
            wait = min(backoff, self._deadline - time.monotonic())
            if wait <= 0:
                return False
            if self._wake.wait(wait):     # close() wakes a long backoff for one last try
                self._wake.clear()
            self._beat()
            backoff = min(backoff * 2, self.max_backoff_s)


# ---- replay ---------------------------------------------------------------------------------------
def replay(client, run_dir: Path, skip_terminate_of: str | None = None) -> tuple[int, int]:
    """Deliver `<run_dir>/tracking/undelivered.jsonl` in order, once. Metric values already stored
    (same key, step, timestamp) are skipped. A terminate op of `skip_terminate_of` is dropped (the run
    is being resumed: the new attempt sets its own end state). Returns (delivered, still undelivered);
    what still fails is written back to the file."""
    path = tracking_dir(run_dir) / SPILL_NAME
    if not path.is_file():
        return 0, 0
    work = path.with_name(f"replaying-{os.getpid()}.jsonl")
    os.replace(path, work)                 # new spills during replay go to a fresh file
    ops = read_ops(work)
    stored: dict[tuple[str, str], set] = {}
    done, failed = 0, []
    for i, op in enumerate(ops):
        op.pop("reason", None)
        if op["op"] == "terminate" and op["run_id"] == skip_terminate_of:
            continue
        try:
            if op["op"] == "metrics":
                op = {**op, "rows": _unstored(client, op, stored)}
                if not op["rows"]:
                    continue
            deliver(client, op, run_dir)
            done += 1
        except Exception as err:
            reason = f"replay: {type(err).__name__}: {err}"[:500]
            if not is_transient(err):     # would fail forever: set aside, as the courier does
                SpillFile(run_dir, REJECTED_NAME).write([op], reason)
                continue
            failed.append({**op, "reason": reason})   # the store is down again: keep the rest, in order
            failed.extend(ops[i + 1:])
            break
    if failed:
        SpillFile(run_dir).write(failed)
    work.unlink()
    return done, len(failed)


def _unstored(client, op: dict, stored: dict) -> list:
    rows = []
    for k, v, ts, step in op["rows"]:
        key = (op["run_id"], k)
        if key not in stored:
            stored[key] = {(m.step, m.timestamp) for m in client.get_metric_history(op["run_id"], k)}
        if (step, ts) not in stored[key]:
            rows.append([k, v, ts, step])
            stored[key].add((step, ts))
    return rows


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def metric_rows(metrics: dict[str, Any], step: int, now_ms: int) -> list[list]:
    import math
    return [[k, float(v), now_ms, int(step)] for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))]
