"""The training stream as a resumable position: (data epoch, micro-batches consumed in it).

Each data epoch is a loader built with its own seed; when it runs out the next one is
built. Every rank steps by optimizer-step count, never by "end of epoch", so ranks with
different batch counts (frame-budget batching) cannot fall out of step under ZeRO-3.
"""
from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from typing import Callable, Iterator

log = logging.getLogger(__name__)


def repartition(state: dict, old_world: int, new_world: int) -> dict:
    """A stream position saved by `old_world` ranks, for `new_world` ranks: the same data epoch at the
    same global micro-batch position (micro-batches summed over ranks), rounded down to a whole number
    per new rank. Each rank's stream is its own seeded draw of the shards (pipeline.py), so the new
    ranks' batches are not the old ones' continuation: the rest of the epoch is a fresh draw, in which
    samples already seen this epoch may come again and others not at all, as across any two epochs."""
    return {"epoch": int(state["epoch"]), "position": int(state["position"]) * old_world // new_world}


class TrainStream:
    def __init__(self, make_loader: Callable[[int], Iterator[dict]], epoch: int = 0, position: int = 0):
        self._make_loader = make_loader
        self.epoch = epoch
        self.position = position
        self.skipped: Counter = Counter()       # bad samples, by reason, since the last report
        self._it: Iterator[dict] | None = None
        self._pending_skip = position

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    @classmethod
    def from_state(cls, make_loader, state: dict | None, fast_forward: bool = True) -> "TrainStream":
        if not state:
            return cls(make_loader)
        stream = cls(make_loader, epoch=int(state["epoch"]), position=int(state["position"]))
        if not fast_forward:     # start the epoch afresh: statistically equivalent, not identical
            stream.epoch, stream.position, stream._pending_skip = stream.epoch + 1, 0, 0
        return stream

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._it is None:
                self._it = iter(self._make_loader(self.epoch))
                if self._pending_skip:
                    log.info("fast-forwarding %d micro-batches of data epoch %d", self._pending_skip, self.epoch)
                    skipped = sum(1 for _ in islice(self._it, self._pending_skip))
                    if skipped < self._pending_skip:     # a shorter epoch (other world size): the next one
                        self.epoch, self.position, self._it = self.epoch + 1, 0, None
                    self._pending_skip = 0
                    if self._it is None:
                        continue
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                continue
            self.position += 1
            self.skipped.update(batch.get("skipped", {}))
            return batch

    def close(self) -> None:
        """End the current loader's worker processes now. They ignore SIGTERM (helper_signals.py), so
        one left for interpreter exit would hang in multiprocessing's atexit terminate()/join()."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)    # torch's multi-process iterator
        if shutdown is not None:
            shutdown()
        if it is not None:
            self._pending_skip = self.position               # a later next() rebuilds the epoch here

    def pop_skipped(self) -> dict[str, int]:
        out, self.skipped = dict(self.skipped), Counter()
        return out
