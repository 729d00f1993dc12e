"""Deliver what a run could not send to MLflow, and close a run left RUNNING by a killed process.

    python launch/replay_tracking.py --run-dir runs/demo

Reads `<run dir>/tracking/undelivered.jsonl` (metrics, params, tags, artefacts, dataset inputs and
the run's end state, in the order they were logged), delivers them to the run's store (the one in
`mlflow_run.json`, `$MLFLOW_TRACKING_URI`, or the run folder's own mlflow.db), skipping metric values
already stored, so it is safe to run twice. Then, if the run is still RUNNING and its owner process
is gone, marks it FAILED. A training start in the run folder does the same by itself.
Exit status: 0 when everything was delivered, 1 when the store is still unreachable or refused ops.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from mlflow.tracking import MlflowClient

    from trainer.tracking.tracker import RUN_ID_FILE
    from trainer.tracking.courier import REJECTED_NAME, replay, tracking_dir
    from trainer.tracking.store import (TrackingUnreachable, check_reachable, close_stale_run,
                                               re_root_artifacts, store_uri)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run folder (holds mlflow_run.json and tracking/)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the store to answer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = Path(args.run_dir)
    id_file = run_dir / RUN_ID_FILE
    if not id_file.is_file():
        print(f"error: {id_file} not found: not a run folder, or it never started tracking", file=sys.stderr)
        return 1
    record = json.loads(id_file.read_text())
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri, own = (record["tracking_uri"], False) if record.get("tracking_uri") and \
        "MLFLOW_TRACKING_URI" not in os.environ else store_uri(run_dir)
    try:
        check_reachable(uri, args.timeout)
    except TrackingUnreachable as err:
        print(f"error: {err}; nothing replayed (try again when it answers)", file=sys.stderr)
        return 1
    if own:
        re_root_artifacts(run_dir)
    client = MlflowClient(tracking_uri=uri)
    done, left = replay(client, run_dir)
    print(f"replayed {done} ops into run {record['run_id']} at {uri}; {left} still undelivered")
    closed = close_stale_run(client, run_dir, record["run_id"])
    print(f"run status: {client.get_run(record['run_id']).info.status}"
          + (" (it was left RUNNING by a process that is gone)" if closed else ""))
    rejected = tracking_dir(run_dir) / REJECTED_NAME
    if rejected.is_file():
        print(f"note: {rejected} holds ops the store refused (see their 'reason')")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
