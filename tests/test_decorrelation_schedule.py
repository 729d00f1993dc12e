"""The decorrelation loss's weighting in the objective (trainer/engine/loss.py): the lambda ramp, and the
gradient norm of each term measured alone. The same on 2 ranks under ZeRO-3: tests/test_token_weighting.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.engine.loss import (GlobalCounts, decorrelation_ramp, micro_batch_share, objective_terms,
                                 term_grad_norms, term_gradient)
from trainer.model.config import ModelConfig


def test_ramp_rises_linearly_to_one_over_the_warmup_steps():
    assert [decorrelation_ramp(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert decorrelation_ramp(0, 0) == 1.0 and decorrelation_ramp(1000, 0) == 1.0     # no ramp: the paper's code


def test_ramp_scales_only_the_decorrelation_share():
    out = SimpleNamespace(ce_loss=torch.tensor(2.0), dec_loss=torch.tensor(100.0), dec_loss_raw=torch.tensor(0.01))
    counts = GlobalCounts(targets=10, prefix=40)
    _, full = micro_batch_share(out, counts, (5, 20))
    _, ramped = micro_batch_share(out, counts, (5, 20), ramp=0.25)
    assert full.tolist() == pytest.approx([1.0 + 50.0, 1.0, 50.0, 0.005])
    assert ramped.tolist() == pytest.approx([1.0 + 12.5, 1.0, 12.5, 0.005])      # the raw L_dec is not ramped


def test_term_gradient_norms_hand_computed():
    # two parameters; ce = w . x (gradient x), dec = 3 * |v|^2 (gradient 6 v); a frozen term has none
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([0.5], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    out = SimpleNamespace(ce_loss=w @ x, dec_loss=3 * (v ** 2).sum())
    ce, dec = objective_terms(out, GlobalCounts(targets=1, prefix=1), (1, 1))
    g_ce, g_dec = term_gradient(ce, [w, v]), term_gradient(dec, [w, v])
    assert g_ce.tolist() == [3.0, 4.0, 0.0] and g_dec.tolist() == [0.0, 0.0, 3.0]
    assert term_gradient(torch.tensor(5.0), [w, v]) is None
    # summed over two micro-batches before the norm: |2 * (3, 4)| = 10, not 5 + 5 per micro-batch
    norms = term_grad_norms({"ce": g_ce + g_ce, "dec": g_dec, "none": None}, torch.device("cpu"))
    assert norms == {"ce": pytest.approx(10.0), "dec": pytest.approx(3.0), "none": 0.0}
    (ce + dec).backward()                      # the graph was kept for the step's own backward
    assert w.grad.tolist() == [3.0, 4.0]


def test_config_rejects_a_negative_ramp():
    with pytest.raises(ValueError, match="decorrelation-warmup-steps"):
        ModelConfig(decorrelation_warmup_steps=-1)
    assert ModelConfig().freeze_delimiters is True          # the paper's code: delimiter rows frozen
