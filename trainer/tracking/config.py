"""Tracking options (MLflow on rank 0)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from trainer.config_checks import Problems


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (rank 0 only)."""
    experiment: Optional[str] = None
    """MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME or 'avsr')."""
    run_name: Optional[str] = None
    """MLflow run name (default: the run folder's name)."""
    on_unreachable: Literal["fail", "continue"] = "fail"
    """When the tracking store does not answer at start: 'fail' (one error, before any process group
    starts) or 'continue' (train without tracking)."""
    connect_timeout_s: float = 10.0
    """How long the start-up check waits for the tracking store (server or locked mlflow.db)."""
    exit_timeout_s: float = 15.0
    """At the end of a run, how long to wait for buffered ops to reach a store that is down; the rest
    is written to <run_dir>/tracking/undelivered.jsonl (see launch/replay_tracking.py). Kept short so
    that a stop signal's checkpoint plus this wait fit in SLURM's grace time (KillWait, often 30 s)."""
    max_queue: int = 10000
    """Tracking ops buffered in memory while the store is down; beyond that they go straight to the
    undelivered file (nothing is dropped, training never waits)."""
    system_metrics_every_s: float = 10.0
    """Seconds between MLflow system metrics samples (CPU, memory, disk, network, GPU) of rank 0's
    machine; 0 = off. Needs psutil (off with a note without it)."""

    def __post_init__(self):
        p = Problems("tracking")
        p.check(self.connect_timeout_s > 0, "connect_timeout_s", f"must be > 0, got {self.connect_timeout_s}")
        p.at_least(self, ("exit_timeout_s", "system_metrics_every_s"), 0)
        p.at_least(self, ("max_queue",), 1, integer=True)
        p.raise_any()
