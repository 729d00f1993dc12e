"""Stop signals belong to the trainer process, not to its helper processes.

SLURM (scancel, `scontrol requeue`, preemption, `--signal`), torchrun and DeepSpeed's launcher
send SIGTERM / SIGUSR1 to every process they see: the trainer, but also its DataLoader workers and
the figure-drawing pool. A helper killed by it turns a graceful stop into an error in the trainer
("DataLoader worker ... is killed by signal: Terminated", "process pool was terminated abruptly").
So helpers are started with the signals blocked (a child inherits the mask, so none can arrive
before it is ready) and then ignore them; the trainer stops them itself when it is done.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread while helper processes are started; a signal that
    arrives meanwhile is delivered to this process when the block ends, not lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals(*_args) -> None:
    """First thing in a helper process (a DataLoader worker_init_fn, a pool initializer)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
