"""Statistics of an evaluation over utterances: corpus rates and their bootstrap intervals.

A corpus WER is a ratio of sums (word errors over reference words), and so is the teacher-forced
loss per token (summed cross-entropy over target tokens): both are computed from per-utterance
counts, which the evaluation reports keep (RUN/eval/*.json, trainer/engine/evaluate.py).

Intervals are percentile bootstraps over utterances: each resample draws n utterances with
replacement and recomputes the ratio of sums, so long utterances weigh as they do in the corpus
rate. Two runs evaluated on the same utterances are compared *paired*: one set of resampled
indices drives both runs, so the utterance-to-utterance variation common to both cancels and the
interval is that of the difference itself (identical runs give [0, 0]). Seeded: the same inputs
and seed give the same interval.

Pure numpy, nothing from the rest of the library: the trainer, the study report and the tests use it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
"""Bootstrap resamples by default: the 2.5 % tail then holds 250 values, so the interval's ends move
by well under a tenth of its width from one seed to another."""
LEVEL = 0.95
CHUNK = 1_000          # resamples drawn at once: bounds memory at CHUNK x n indices


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval."""
    value: float
    low: float
    high: float
    n: int
    """Utterances (or items) it was computed over."""
    resamples: int
    level: float = LEVEL

    @property
    def ci(self) -> list[float]:
        return [self.low, self.high]

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95" if self.level == LEVEL else f"ci{round(100 * self.level)}": self.ci,
                "n": self.n, "resamples": self.resamples}


def _arrays(*columns: Sequence[float]) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    n = len(arrays[0])
    if n == 0:
        raise ValueError("no utterances: a rate needs at least one")
    if any(a.ndim != 1 or len(a) != n for a in arrays):
        raise ValueError(f"per-utterance columns must be 1-D of one length, got shapes {[a.shape for a in arrays]}")
    return arrays


def ratio_of_sums(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """sum(numerators) / sum(denominators): corpus WER from per-utterance errors and reference words."""
    num, den = _arrays(numerators, denominators)
    total = den.sum()
    if total <= 0:
        raise ValueError(f"the denominators sum to {total}: no reference words / target tokens")
    return float(num.sum() / total)


def _bootstrap(stat, n: int, resamples: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of stat(indices [k, n]) -> [k] over `resamples` draws of n indices."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    values = np.concatenate([stat(rng.integers(0, n, size=(min(CHUNK, resamples - start), n)))
                             for start in range(0, resamples, CHUNK)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], *, resamples: int = RESAMPLES,
                    seed: int = 0, level: float = LEVEL) -> Estimate:
    """sum(num) / sum(den) with its percentile bootstrap interval over items (utterances)."""
    num, den = _arrays(numerators, denominators)
    value = ratio_of_sums(num, den)
    # A resample whose denominators sum to 0 (only empty references drawn) has no rate: it counts as
    # the rate of an empty corpus, 0 errors per word (max() keeps the division defined).
    low, high = _bootstrap(lambda idx: num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12),
                           len(num), resamples, seed, level)
    return Estimate(value, low, high, len(num), resamples, level)


def bootstrap_mean(values: Sequence[float], **kwargs) -> Estimate:
    """The mean of per-item values (e.g. intermediate sinks per probe clip) with its bootstrap interval."""
    (vals,) = _arrays(values)
    return bootstrap_ratio(vals, np.ones_like(vals), **kwargs)


def paired_difference(numerators_a: Sequence[float], numerators_b: Sequence[float],
                      denominators: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Estimate:
    """rate_b - rate_a of two runs on the same utterances (rate = sum(num) / sum(den); the denominators,
    reference words, are the utterances' own and so shared), with a paired bootstrap interval: each
    resample draws one set of utterances for both runs. Positive: run b has the higher rate."""
    a, b, den = _arrays(numerators_a, numerators_b, denominators)
    value = ratio_of_sums(b, den) - ratio_of_sums(a, den)
    diff = b - a
    low, high = _bootstrap(lambda idx: diff[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12),
                           len(diff), resamples, seed, level)
    return Estimate(value, low, high, len(diff), resamples, level)


def paired_ratio_difference(numerators_a: Sequence[float], denominators_a: Sequence[float],
                            numerators_b: Sequence[float], denominators_b: Sequence[float], *,
                            resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Estimate:
    """rate_b - rate_a where each run has its own denominators per utterance (the loss per token: two
    runs may tokenise alike, but nothing requires it), paired over utterances as above."""
    na, da, nb, db = _arrays(numerators_a, denominators_a, numerators_b, denominators_b)
    value = ratio_of_sums(nb, db) - ratio_of_sums(na, da)

    def stat(idx):
        return nb[idx].sum(1) / np.maximum(db[idx].sum(1), 1e-12) - na[idx].sum(1) / np.maximum(da[idx].sum(1), 1e-12)

    low, high = _bootstrap(stat, len(na), resamples, seed, level)
    return Estimate(value, low, high, len(na), resamples, level)


def paired_rows(rows_a: Sequence[dict], rows_b: Sequence[dict], key: str = "key") -> tuple[list[dict], list[dict]]:
    """Two runs' per-utterance rows in one order, refusing anything but the same set of utterances
    (a paired comparison over different utterances would be neither paired nor comparable)."""
    by_a, by_b = {r[key]: r for r in rows_a}, {r[key]: r for r in rows_b}
    if len(by_a) != len(rows_a) or len(by_b) != len(rows_b):
        raise ValueError("duplicate utterance keys in an evaluation report")
    if by_a.keys() != by_b.keys():
        only_a, only_b = sorted(by_a.keys() - by_b.keys()), sorted(by_b.keys() - by_a.keys())
        raise ValueError(f"the runs were evaluated on different utterances: {len(only_a)} only in the first "
                         f"({only_a[:3]}), {len(only_b)} only in the second ({only_b[:3]})")
    keys = sorted(by_a)
    return [by_a[k] for k in keys], [by_b[k] for k in keys]
