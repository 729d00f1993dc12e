"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, scancel, timeouts).

The handler only sets a flag; the loop checks it at a step boundary, agrees across
ranks (one all-reduce), writes a checkpoint and marks the MLflow run KILLED.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
