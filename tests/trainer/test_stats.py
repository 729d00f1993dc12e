"""trainer/stats.py: corpus rates from per-utterance counts and their bootstrap intervals.

Hand-computed cases (two utterances have only three distinct resamples, with known probabilities) and
the properties a reader relies on: the interval holds the point estimate, narrows as utterances are
added, a paired comparison of a run with itself is exactly [0, 0], and a seed fixes the interval.
"""
from __future__ import annotations

import numpy as np
import pytest

from trainer import stats


def _fake_run(n: int, seed: int, wer: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    words = rng.integers(4, 9, size=n)
    errors = rng.binomial(words, wer)
    return errors, words


def test_corpus_wer_is_a_ratio_of_sums_not_a_mean_of_rates():
    # 3 errors over 15 words = 0.2; the mean of the per-utterance rates would be (1/4 + 0 + 2/5) / 3 = 0.217
    assert stats.ratio_of_sums([1, 0, 2], [4, 6, 5]) == pytest.approx(0.2)


def test_two_utterances_hand_computed_percentiles():
    # errors [0, 2] over [2, 2] words: resamples give WER 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4)
    est = stats.bootstrap_ratio([0, 2], [2, 2], resamples=4000, seed=1)
    assert est.value == 0.5
    assert est.ci == [0.0, 1.0]
    middle = stats.bootstrap_ratio([0, 2], [2, 2], resamples=4000, seed=1, level=0.4)   # 30th..70th percentile
    assert middle.ci == [0.5, 0.5]
    assert est.n == 2 and est.resamples == 4000


def test_one_utterance_has_no_spread():
    est = stats.bootstrap_ratio([3], [7], resamples=100)
    assert est.ci == [pytest.approx(3 / 7)] * 2


def test_interval_contains_the_estimate_and_shrinks_with_n():
    errors, words = _fake_run(40, seed=0)
    small = stats.bootstrap_ratio(errors, words, resamples=2000, seed=3)
    large = stats.bootstrap_ratio(np.tile(errors, 16), np.tile(words, 16), resamples=2000, seed=3)
    for est in (small, large):
        assert est.low <= est.value <= est.high
    assert large.value == pytest.approx(small.value)         # same corpus rate, 16x the utterances
    # width ~ 1/sqrt(n): 16x the utterances -> ~1/4 of the width
    assert (large.high - large.low) < 0.35 * (small.high - small.low)


def test_seeded_reproducible():
    errors, words = _fake_run(60, seed=1)
    a = stats.bootstrap_ratio(errors, words, resamples=3000, seed=7)
    b = stats.bootstrap_ratio(errors, words, resamples=3000, seed=7)
    c = stats.bootstrap_ratio(errors, words, resamples=3000, seed=8)
    assert a == b
    assert a.ci != c.ci
    # 10 000 resamples by default: another seed moves the ends by a small part of the width
    d, e = (stats.bootstrap_ratio(errors, words, seed=s) for s in (0, 1))
    assert d.resamples == stats.RESAMPLES == 10_000
    assert abs(d.low - e.low) < 0.1 * (d.high - d.low)


def test_paired_difference_of_identical_runs_is_exactly_zero():
    errors, words = _fake_run(50, seed=2)
    est = stats.paired_difference(errors, errors, words, resamples=500)
    assert (est.value, est.low, est.high) == (0.0, 0.0, 0.0)


def test_paired_difference_hand_computed_and_sign():
    # run b makes one more error in 10 words: +0.1; b - a, so positive means b is worse
    est = stats.paired_difference([1, 1], [2, 1], [5, 5], resamples=4000, seed=0)
    assert est.value == pytest.approx(0.1)
    # resamples: (u0, u0) +0.2, mixed +0.1, (u1, u1) 0
    assert est.ci == [pytest.approx(0.0), pytest.approx(0.2)]
    flipped = stats.paired_difference([2, 1], [1, 1], [5, 5], resamples=4000, seed=0)
    assert flipped.value == pytest.approx(-0.1) and flipped.ci == [pytest.approx(-0.2), pytest.approx(0.0)]


def test_pairing_removes_the_shared_variation():
    # b = a + one error on every 10th utterance: a small, consistent effect the unpaired intervals
    # cannot see (they overlap) but the paired one excludes 0
    errors, words = _fake_run(200, seed=4, wer=0.3)
    worse = errors + (np.arange(200) % 10 == 0)
    a, b = (stats.bootstrap_ratio(e, words, resamples=2000) for e in (errors, worse))
    assert a.high > b.low                                   # unpaired: overlapping intervals
    diff = stats.paired_difference(errors, worse, words, resamples=2000)
    assert diff.low > 0
    assert diff.value == pytest.approx(b.value - a.value)


def test_loss_per_token_difference_with_own_denominators():
    est = stats.paired_ratio_difference([2.0, 4.0], [2, 4], [3.0, 3.0], [2, 4], resamples=500)
    assert est.value == pytest.approx(6 / 6 - 6 / 6)
    same = stats.paired_ratio_difference([2.0, 4.0], [2, 4], [2.0, 4.0], [2, 4], resamples=500)
    assert same.ci == [0.0, 0.0]


def test_bootstrap_mean():
    est = stats.bootstrap_mean([1, 1, 1, 1])
    assert (est.value, est.low, est.high) == (1.0, 1.0, 1.0)
    spread = stats.bootstrap_mean([0, 2, 0, 2, 1, 1], resamples=2000)
    assert spread.value == pytest.approx(1.0) and spread.low < 1.0 < spread.high


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="no utterances"):
        stats.bootstrap_ratio([], [])
    with pytest.raises(ValueError, match="one length"):
        stats.paired_difference([1, 2], [1], [3, 3])
    with pytest.raises(ValueError, match="no reference words"):
        stats.ratio_of_sums([1], [0])
    with pytest.raises(ValueError, match="resamples"):
        stats.bootstrap_ratio([1], [2], resamples=0)


def test_paired_rows_align_by_key_and_refuse_other_utterances():
    a = [{"key": "u2", "e": 1}, {"key": "u1", "e": 0}]
    b = [{"key": "u1", "e": 5}, {"key": "u2", "e": 6}]
    ra, rb = stats.paired_rows(a, b)
    assert [r["key"] for r in ra] == [r["key"] for r in rb] == ["u1", "u2"]
    with pytest.raises(ValueError, match="different utterances"):
        stats.paired_rows(a, [{"key": "u1"}, {"key": "u3"}])
    with pytest.raises(ValueError, match="duplicate"):
        stats.paired_rows(a + a[:1], b)


def test_estimate_to_dict():
    d = stats.bootstrap_ratio([1, 2], [4, 4], resamples=10).to_dict()
    assert set(d) == {"value", "ci95", "n", "resamples"} and len(d["ci95"]) == 2
