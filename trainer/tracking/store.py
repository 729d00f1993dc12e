"""The tracking store around a run: does it answer, does it point into this run folder, and was
the run left RUNNING by a process that died.

- `check_reachable` runs before the process group starts: an MLflow server that does not answer, or
  a local mlflow.db that stays locked, is one clear error within `timeout_s`.
- `re_root_artifacts`: MLflow stores artifact locations as absolute URIs in mlflow.db; a copied or
  moved run folder would log into the original. On every start the default store's locations that
  end in `<somewhere>/mlartifacts` are pointed at this folder's `mlartifacts`.
- `close_stale_run`: the owner of a run (rank 0) writes `tracking/owner.json` with its pid, host and
  a heartbeat every ~15 s. A RUNNING run whose owner is gone (kill -9, node lost) is marked FAILED,
  with its end time at the last heartbeat, by the next start of the run folder or by
  `launch/replay_tracking.py`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"
STALE_AFTER_S = 120.0          # a heartbeat older than this means the owner is gone


class TrackingUnreachable(RuntimeError):
    pass


def store_uri(run_dir: str | Path) -> tuple[str, bool]:
    """(tracking URI, whether it is the run folder's own default store)."""
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if user_uri:
        return user_uri, False
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}", True


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnreachable unless the store answers within about `timeout_s`."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri, timeout_s)
    # other stores (databricks, postgresql, ...): MLflow's client reports its own errors


def _check_http(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    deadline = time.monotonic() + timeout_s
    while True:
        left = min(10.0, deadline - time.monotonic())
        try:
            urllib.request.urlopen(url, timeout=max(5.0, left)).close()   # a loaded server is slow
            return
        except urllib.error.HTTPError as err:
            if err.code < 500:        # it answered (404: no such experiment, 401: needs credentials)
                return
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if time.monotonic() + 2.0 > deadline:
            raise TrackingUnreachable(f"MLflow tracking server {uri} does not answer ({last}; "
                                      f"tried for {timeout_s:.0f} s)")
        time.sleep(2.0)


def _check_sqlite(uri: str, timeout_s: float) -> None:
    path = Path(uri[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingUnreachable(f"cannot create the folder of the MLflow store {path}: {err}") from err
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise TrackingUnreachable(f"cannot write the MLflow store {path}: folder not writable")
        return
    try:
        conn = sqlite3.connect(str(path), timeout=timeout_s)
        try:
            conn.execute("BEGIN IMMEDIATE")     # a write lock: what logging will need
            conn.rollback()
        finally:
            conn.close()
    except sqlite3.Error as err:
        raise TrackingUnreachable(f"MLflow store {path} is not writable ({err}; waited {timeout_s:.0f} s: "
                                  f"another process holds a lock on it?)") from err


# ---- a copied or moved run folder -------------------------------------------------------------------
_LOCATIONS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"))


def re_root_artifacts(run_dir: str | Path) -> int:
    """Point every `file://.../mlartifacts[...]` location in `<run_dir>/mlflow.db` at this run folder's
    `mlartifacts`. Returns the number of rows changed (0 when the folder did not move)."""
    db = Path(run_dir) / "mlflow.db"
    if not db.is_file():
        return 0
    new_root = (Path(run_dir) / "mlartifacts").resolve().as_uri()
    changed, old_roots = 0, set()
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        with conn:
            for table, column in _LOCATIONS:
                cols = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if column not in cols:
                    continue
                for (value,) in conn.execute(f"SELECT DISTINCT {column} FROM {table}").fetchall():
                    old_root = _artifact_root(value)
                    if old_root is None or old_root == new_root:
                        continue
                    old_roots.add(old_root)
                    cur = conn.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?",
                                       (new_root + value[len(old_root):], value))
                    changed += cur.rowcount
    finally:
        conn.close()
    if changed:
        log.warning("this run folder was copied or moved: %d MLflow artifact locations re-rooted from %s to %s",
                    changed, ", ".join(sorted(old_roots)), new_root)
    return changed


def _artifact_root(value: str | None) -> str | None:
    if not value or not value.startswith("file:"):
        return None
    i = value.rfind("/mlartifacts")
    end = i + len("/mlartifacts")
    if i < 0 or (end < len(value) and value[end] != "/"):
        return None
    return value[:end]


# ---- the owner's heartbeat, and runs left RUNNING ---------------------------------------------------
def write_owner(run_dir: str | Path, run_id: str, ended: str | None = None) -> None:
    path = Path(run_dir) / "tracking" / OWNER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{OWNER_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                               "heartbeat": time.time(), "ended": ended}))
    os.replace(tmp, path)


def read_owner(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "tracking" / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def owner_gone(owner: dict | None, run_id: str) -> str | None:
    """Why the run's owner is gone, or None when it looks alive."""
    if owner is None or owner.get("run_id") != run_id:
        return "no owner record in this run folder"
    age = time.time() - float(owner.get("heartbeat", 0))
    if owner.get("host") == socket.gethostname() and owner.get("pid") != os.getpid():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return f"its process (pid {owner['pid']} on {owner['host']}) is gone"
        except PermissionError:
            pass
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (pid {owner.get('pid')} on {owner.get('host')})"
    return None


def close_stale_run(client, run_dir: str | Path, run_id: str) -> bool:
    """Mark `run_id` FAILED when it is RUNNING but its owner is gone. True when it did."""
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    owner = read_owner(run_dir)
    why = owner_gone(owner, run_id)
    if why is None:
        log.warning("MLflow run %s is RUNNING and its owner (pid %s on %s) still beats: is another process "
                    "using this run folder?", run_id, owner.get("pid"), owner.get("host"))
        return False
    end_ms = int(1000 * float(owner["heartbeat"])) if owner and owner.get("run_id") == run_id \
        else int(time.time() * 1000)
    client.set_tag(run_id, "avsr.closed_as_stale", f"was RUNNING but {why}; marked FAILED")
    client.set_terminated(run_id, status="FAILED", end_time=end_ms)
    log.warning("MLflow run %s was left RUNNING (%s): marked FAILED", run_id, why)
    return True
