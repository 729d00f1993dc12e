"""The decorrelation loss's weighting in the objective (trainer/engine/loss.py): the lambda ramp, and the
gradient norm of each term measured alone. The same on 2 ranks under ZeRO-3: tests/trainer/engine/test_loss_layouts.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.engine.loss import GlobalCounts, decorrelation_ramp, micro_batch_share, term_grad_norms, term_gradients
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


class _TwoTerms(torch.nn.Module):
    """ce = w . x (gradient x), dec = lam * |v|^2 (gradient 2 lam v); `frozen` takes part in neither gradient."""

    def __init__(self, lam: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.v = torch.nn.Parameter(torch.tensor([0.5]))
        self.frozen = torch.nn.Parameter(torch.tensor([7.0]), requires_grad=False)
        self.lam = lam

    def forward(self, batch):
        dec = self.lam * (self.v ** 2).sum() if self.lam else torch.tensor(0.0)
        return SimpleNamespace(ce_loss=self.w @ batch["x"] * self.frozen / 7.0, dec_loss=dec)


def test_term_gradients_hand_computed():
    model = _TwoTerms(lam=3.0)
    batch = {"x": torch.tensor([3.0, 4.0])}
    grads = term_gradients(model, batch, GlobalCounts(targets=1, prefix=1), (1, 1))
    assert grads["ce"].tolist() == [3.0, 4.0, 0.0] and grads["dec"].tolist() == [0.0, 0.0, 3.0]
    assert model.w.grad is None and model.v.grad is None       # the model's own parameters are not touched
    # weighted as the objective: half the targets and a ramp of 0.5 on the decorrelation share
    half = term_gradients(model, batch, GlobalCounts(targets=2, prefix=1), (1, 1), ramp=0.5)
    assert half["ce"].tolist() == [1.5, 2.0, 0.0] and half["dec"].tolist() == [0.0, 0.0, 1.5]
    assert term_gradients(_TwoTerms(lam=0.0), batch, GlobalCounts(1, 1), (1, 1))["dec"] is None
    # summed over two micro-batches before the norm: |2 * (3, 4)| = 10, not 5 + 5 per micro-batch
    norms = term_grad_norms({"ce": grads["ce"] * 2, "dec": grads["dec"], "none": None}, torch.device("cpu"))
    assert norms == {"ce": pytest.approx(10.0), "dec": pytest.approx(3.0), "none": 0.0}


def test_config_rejects_a_negative_ramp():
    with pytest.raises(ValueError, match="decorrelation-warmup-steps"):
        ModelConfig(decorrelation_warmup_steps=-1)
    from trainer.config import load_recipe
    from tests.constants import REPO
    assert ModelConfig().freeze_delimiters is False         # the demo trains its random delimiter rows
    for recipe in ("mini_asr", "mini_avsr", "mini_avsr_decorr", "lrs3_avsr_decorr"):   # the paper's code freezes them
        assert load_recipe(REPO / "launch" / "recipes" / f"{recipe}.yaml").model.freeze_delimiters is True
