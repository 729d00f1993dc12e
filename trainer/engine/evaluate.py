"""WER evaluation across ranks.

Ranks hold different numbers of eval batches (each reads its own shards), but under
ZeRO-3 generation all-gathers parameters on every forward, so all ranks must call
generate the same number of times: a rank that has run out repeats its last batch
and throws the result away, until no rank has data left.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from trainer import distributed
from trainer.data.skips import SkipCounter

log = logging.getLogger(__name__)


def _any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR over ranks, in one all-reduce."""
    t = distributed.all_reduce_(torch.tensor([1.0 if f else 0.0 for f in flags], device=device), op="max")
    return [bool(x) for x in t.tolist()]


@dataclass(frozen=True)
class PeriodicEval:
    """When the validation split is decoded during training."""
    every: int
    """Every `every` optimizer steps; 0: never during training."""
    max_steps: int
    """The run's last step, left to the final evaluations (which use their own splits and beams)."""

    def should_run(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < self.max_steps


class EvalInterrupted(Exception):
    """A stop signal (SLURM time limit, preemption) arrived during evaluation: the partial result is
    dropped so that the trainer can checkpoint within the signal's grace time."""


def _first_and_filler(it):
    """This rank's first batch, and a filler for ranks whose share of the eval set is empty: the
    lowest rank with data sends its first batch (all ranks take part in the collectives)."""
    first = next(it, None)
    flags = distributed.all_gather_object(first is not None)
    if all(flags) or not any(flags):
        return first, first
    filler = distributed.broadcast_object(first, src=flags.index(True))
    return first, (first if first is not None else filler)


@torch.no_grad()
def evaluate_wer(model, batches: Iterable[dict], *, tokenizer, device: torch.device, to_device, num_beams: int,
                 max_new_tokens: int, synced_gpus: bool, max_samples: int | None = None,
                 rank: int = 0, desc: str = "eval", report_path: Path | None = None,
                 stop_requested=lambda: False) -> dict[str, float]:
    """WER/CER over this rank's batches, gathered from all ranks. Raises EvalInterrupted on every rank
    as soon as `stop_requested()` is true on any rank (checked before each batch, with the same
    all-reduce that keeps the ranks in lockstep). `tokenizer` decodes the generated ids."""
    from trainer.model.metrics import error_counts
    from trainer.model.prompt_text import decode_transcripts

    was_training = model.training
    model.eval()
    it = iter(batches)
    first, last = _first_and_filler(it)
    it = itertools.chain([first], it) if first is not None else iter(())
    # The cap is over all ranks: each rank decodes its share, whole batches, then trims.
    world = distributed.world_size()
    cap = None if max_samples is None else -(-max_samples // world)
    rows: list[dict] = []
    skipped: Counter = Counter()          # bad samples this rank's loader dropped (its workers' drains)
    bar = tqdm(desc=desc, unit="utt", disable=rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    while True:
        batch = None
        if cap is None or len(rows) < cap:
            batch = next(it, None)
        has_batch, stop = _any_rank([batch is not None, bool(stop_requested())], device)
        if not has_batch:        # every rank is through: a complete result is kept, stop or not
            break
        if stop:
            bar.close()
            model.train(was_training)
            raise EvalInterrupted(f"{desc}: stopped by a signal after {len(rows)} utterances on rank {rank}")
        real = batch is not None
        batch = batch if real else last
        last = batch
        hyps = decode_transcripts(tokenizer, model.generate(to_device(batch), num_beams=num_beams,
                                                            max_new_tokens=max_new_tokens, synced_gpus=synced_gpus))
        if real:
            skipped.update(batch.get("skipped", {}))
            rows.extend({"key": k, "ref": r, "hyp": h} for k, r, h in zip(batch["keys"], batch["text"], hyps))
            bar.update(len(hyps))
    bar.close()
    model.train(was_training)

    parts = distributed.all_gather_object((rows[:cap], dict(skipped)))
    all_rows = [r for rows_, _ in parts for r in rows_][:max_samples]
    all_skipped: Counter = Counter()
    for _, counts in parts:
        all_skipped.update(counts)
    counts = error_counts([r["ref"] for r in all_rows], [r["hyp"] for r in all_rows])
    result = {
        "wer": counts.wer, "cer": counts.cer, "num_utterances": float(len(all_rows)),
        "ref_words": float(counts.ref_words), "eval_time_s": time.perf_counter() - t0,
        "skipped": float(SkipCounter(counts=all_skipped).total),
        **{f"skipped/{r}": float(n) for r, n in sorted(all_skipped.items())},
    }
    if rank == 0 and report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps({"summary": result, "utterances": sorted(all_rows, key=lambda r: r["key"])},
                                          indent=1))
    return result
