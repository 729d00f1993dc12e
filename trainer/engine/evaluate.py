"""Evaluation across ranks: WER (generation) and the teacher-forced loss per token.

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


def _lockstep(batches: Iterable[dict], device: torch.device, cap: int | None, stop_requested, what: str):
    """(batch, real) in the same number on every rank: a rank that has run out (or reached its `cap` of
    utterances) repeats its last batch with real=False until no rank has data left. Raises
    EvalInterrupted on every rank as soon as `stop_requested()` is true on any rank (checked before each
    batch, in the all-reduce that keeps the ranks in step)."""
    it = iter(batches)
    first, last = _first_and_filler(it)
    it = itertools.chain([first], it) if first is not None else iter(())
    taken = 0
    while True:
        batch = next(it, None) if cap is None or taken < cap else None
        has_batch, stop = _any_rank([batch is not None, bool(stop_requested())], device)
        if not has_batch:        # every rank is through: a complete result is kept, stop or not
            return
        if stop:
            raise EvalInterrupted(f"{what}: stopped by a signal after {taken} utterances on rank "
                                  f"{distributed.rank()}")
        real = batch is not None
        batch = last = batch if real else last
        taken += len(batch["keys"]) if real else 0
        yield batch, real


def _nll_rows(model, batch: dict, tokenizer, to_device) -> list[dict]:
    """Teacher-forced cross-entropy per utterance: the training loss's sum over its target tokens
    (transcript + EOS) and their number."""
    from trainer.model.prompt_text import with_transcript_ids

    nll, tokens = model.target_nll(to_device(with_transcript_ids(tokenizer, batch)))
    return [{"nll": float(a), "target_tokens": int(b)} for a, b in zip(nll.tolist(), tokens.tolist())]


@torch.no_grad()
def evaluate_wer(model, batches: Iterable[dict], *, tokenizer, device: torch.device, to_device, num_beams: int,
                 max_new_tokens: int, synced_gpus: bool, max_samples: int | None = None,
                 rank: int = 0, desc: str = "eval", report_path: Path | None = None,
                 stop_requested=lambda: False, loss: bool = False) -> dict[str, float]:
    """WER/CER over this rank's batches, gathered from all ranks, and with `loss` the teacher-forced
    loss per target token on the same utterances (one extra forward per batch, no generation). The
    report at `report_path` has per utterance its reference, hypothesis, word errors and reference
    words (trainer/stats.py bootstraps over them) and, with `loss`, its summed cross-entropy and
    target tokens. Raises EvalInterrupted on a stop signal (`_lockstep`). `tokenizer` decodes the
    generated ids and tokenizes the references for the loss."""
    return _evaluate(model, batches, tokenizer=tokenizer, device=device, to_device=to_device, decode=True, loss=loss,
                     generate_kwargs={"num_beams": num_beams, "max_new_tokens": max_new_tokens,
                                      "synced_gpus": synced_gpus},
                     max_samples=max_samples, rank=rank, desc=desc, report_path=report_path,
                     stop_requested=stop_requested)


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict], *, tokenizer, device: torch.device, to_device,
                  max_samples: int | None = None, rank: int = 0, desc: str = "loss",
                  report_path: Path | None = None, stop_requested=lambda: False) -> dict[str, float]:
    """The teacher-forced loss per target token only (no generation): a cheap, continuous measure for
    the validation curve of a run."""
    return _evaluate(model, batches, tokenizer=tokenizer, device=device, to_device=to_device, decode=False, loss=True,
                     generate_kwargs={}, max_samples=max_samples, rank=rank, desc=desc, report_path=report_path,
                     stop_requested=stop_requested)


def _evaluate(model, batches, *, tokenizer, device, to_device, decode: bool, loss: bool, generate_kwargs: dict,
              max_samples: int | None, rank: int, desc: str, report_path: Path | None, stop_requested) -> dict:
    from trainer.model.metrics import utterance_counts
    from trainer.model.prompt_text import decode_transcripts

    was_training = model.training
    model.eval()
    # The cap is over all ranks: each rank evaluates its share, whole batches, then trims.
    world = distributed.world_size()
    cap = None if max_samples is None else -(-max_samples // world)
    rows: list[dict] = []
    skipped: Counter = Counter()          # bad samples this rank's loader dropped (its workers' drains)
    bar = tqdm(desc=desc, unit="utt", disable=rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for batch, real in _lockstep(batches, device, cap, stop_requested, desc):
            new = [{"key": k, "ref": r} for k, r in zip(batch["keys"], batch["text"])]
            if loss:
                for row, nll in zip(new, _nll_rows(model, batch, tokenizer, to_device)):
                    row.update(nll)
            if decode:
                hyps = decode_transcripts(tokenizer, model.generate(to_device(batch), **generate_kwargs))
                for row, hyp, c in zip(new, hyps, utterance_counts(batch["text"], hyps)):
                    row.update(hyp=hyp, word_errors=c.word_errors, ref_words=c.ref_words,
                               char_errors=c.char_errors, ref_chars=c.ref_chars)
            if real:
                skipped.update(batch.get("skipped", {}))
                rows.extend(new)
                bar.update(len(new))
    finally:
        bar.close()
        model.train(was_training)

    parts = distributed.all_gather_object((rows[:cap], dict(skipped)))
    all_rows = [r for rows_, _ in parts for r in rows_][:max_samples]
    all_skipped: Counter = Counter()
    for _, counts in parts:
        all_skipped.update(counts)
    result: dict[str, float] = {"num_utterances": float(len(all_rows))}
    if decode:
        words = sum(r["ref_words"] for r in all_rows)
        result.update(wer=sum(r["word_errors"] for r in all_rows) / max(words, 1),
                      cer=sum(r["char_errors"] for r in all_rows) / max(sum(r["ref_chars"] for r in all_rows), 1),
                      ref_words=float(words))
    if loss:
        tokens = sum(r["target_tokens"] for r in all_rows)
        result.update(loss_per_token=sum(r["nll"] for r in all_rows) / max(tokens, 1), target_tokens=float(tokens))
    result.update({"eval_time_s": time.perf_counter() - t0, "skipped": float(SkipCounter(counts=all_skipped).total),
                   **{f"skipped/{r}": float(n) for r, n in sorted(all_skipped.items())}})
    if rank == 0 and report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps({"summary": result, "utterances": sorted(all_rows, key=lambda r: r["key"])},
                                          indent=1))
    return result
