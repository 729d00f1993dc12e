"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, scancel, requeue, time limits).

The handler only sets a flag; the loop checks it at a step boundary, agrees across ranks (one
all-reduce), writes a checkpoint and marks the MLflow run KILLED. Helper processes (DataLoader
workers, the figure pool) ignore these signals: trainer/helper_signals.py.

A launcher that dies without passing the signal on counts as a stop too: the `deepspeed` runner
has no SIGTERM handler (single node), so `kill -TERM <runner>` ends it and leaves its
`deepspeed.launcher.launch` child and the ranks running unattended; a SIGKILLed torchrun does the
same. The ranks notice that their launcher (or the runner above it) is gone by its parent id.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch

from trainer import distributed
from trainer.helper_signals import STOP_SIGNALS

log = logging.getLogger(__name__)

LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed.launcher.launch")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid`, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def launcher_links(pid: int | None = None) -> list[tuple[int, int]]:
    """(process, its parent) pairs whose break means the launch is gone: this rank and its launcher
    when it was started by one, and the launcher and the `deepspeed` runner above it. A process run
    straight from a shell watches nothing (a closed terminal is not a stop)."""
    pid = os.getpid() if pid is None else pid
    parent = parent_of(pid)
    if parent is None or not any(name in _cmdline(parent) for name in LAUNCHERS):
        return []
    links = [(pid, parent)]
    grand = parent_of(parent)
    if grand and "deepspeed.launcher.launch" in _cmdline(parent) and "deepspeed" in _cmdline(grand):
        links.append((parent, grand))
    return links


class StopSignal:
    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._links: list[tuple[int, int]] = []

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._links = launcher_links()
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            log.warning("received %s: stopping after this step with a checkpoint",
                        signal.Signals(signum).name)
        self.received = signum

    def requested(self) -> bool:
        """A stop signal arrived, or the launcher above this rank is gone."""
        if self.received is None:
            for pid, parent in self._links:
                if parent_of(pid) != parent:
                    log.warning("launcher process %d is gone: stopping after this step with a checkpoint",
                                parent)
                    self.received = signal.SIGTERM
                    break
        return self.received is not None

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was asked to stop."""
        return distributed.any_rank(self.requested(), device)
