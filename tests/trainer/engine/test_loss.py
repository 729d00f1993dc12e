"""trainer/engine/loss.py in one process: the step's objective is the token mean over the whole global
batch (each micro-batch's share weighted by the global token counts), the counts are checked after the
backward, the backward undoes DeepSpeed's divisions, the decorrelation ramp, and the gradient norm of each
term measured alone. The same on 2 ranks under ZeRO-3 with the real model:
tests/trainer/engine/test_loss_layouts.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer.engine.loss import (GlobalCounts, backward, check_counts, decorrelation_ramp, micro_batch_share,
                                 term_grad_norms, term_gradients)
from trainer.model.config import ModelConfig


class _Out:
    """What the model's forward returns for one micro-batch: token means and the token counts."""

    def __init__(self, ce, dec, raw, targets, prefix):
        self.ce_loss, self.dec_loss, self.dec_loss_raw = ce, dec, raw
        self.num_target_tokens, self.num_prefix_tokens = torch.tensor(targets), torch.tensor(prefix)


def test_the_counts_of_a_step_are_summed_over_its_micro_batches_without_a_process_group():
    counts = GlobalCounts.all_reduced([(3, 10), (9, 30), (0, 0)], torch.device("cpu"))
    assert counts == GlobalCounts(targets=12, prefix=40)


def test_uneven_micro_batches_give_the_global_token_mean_and_its_gradient():
    """Token CEs w * x_t over micro-batches of 1, 5 and 2 target tokens: the summed shares are the mean over
    all 8 tokens, and so is their gradient; the mean of per-micro-batch means (what averaging losses over
    micro-batches gives) would weight the lone token 5 times as much as each of its neighbours."""
    x = [torch.tensor([4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([6.0, 7.0])]
    w = torch.nn.Parameter(torch.tensor(0.5))
    counts = GlobalCounts.all_reduced([(len(t), 0) for t in x], torch.device("cpu"))
    total, logged = torch.zeros(()), torch.zeros(4)
    for t in x:
        out = _Out((w * t).mean(), torch.zeros(()), torch.tensor(float("nan")), len(t), 0)
        loss, share = micro_batch_share(out, counts, (len(t), 0))
        loss.backward()
        total, logged = total + loss.detach(), logged + share
    everything = torch.cat(x)
    torch.testing.assert_close(total, 0.5 * everything.mean())
    torch.testing.assert_close(w.grad, everything.mean())
    assert logged[:3].tolist() == pytest.approx([0.5 * everything.mean().item(), 0.5 * everything.mean().item(), 0.0])
    assert torch.isnan(logged[3])                   # the raw L_dec: not measured in this step
    per_batch = torch.stack([t.mean() for t in x]).mean()
    assert abs(per_batch - everything.mean()) > 0.3     # the mistake this weighting avoids is not a rounding


def test_loss_share_is_fp32_and_weighted_by_the_global_counts():
    """Two micro-batches of 3 and 9 target tokens: their shares add up to the global token means."""
    counts = GlobalCounts(targets=12, prefix=40)
    a = _Out(torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(0.5), torch.tensor(0.05), 3, 10)
    b = _Out(torch.tensor(1.0, dtype=torch.bfloat16), torch.tensor(0.25), torch.tensor(0.025), 9, 30)
    (la, sa), (lb, sb) = micro_batch_share(a, counts, (3, 10)), micro_batch_share(b, counts, (9, 30))
    assert la.dtype is torch.float32 and sa.dtype is torch.float32
    total = sa + sb                                   # loss, ce, dec, dec_raw
    torch.testing.assert_close(total, torch.tensor([(2 * 3 + 1 * 9) / 12 + (0.5 * 10 + 0.25 * 30) / 40,
                                                    (2 * 3 + 1 * 9) / 12, (0.5 * 10 + 0.25 * 30) / 40,
                                                    (0.05 * 10 + 0.025 * 30) / 40]))


def test_counts_that_differ_from_the_forwards_are_an_error_after_the_backward():
    out = _Out(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), 3, 10)
    check_counts(out, (3, 10))
    with pytest.raises(RuntimeError, match=r"\(3 targets, 10 prefix\) differ from those computed before it \(4, 10\)"):
        check_counts(out, (4, 10))


def test_backward_undoes_deepspeeds_division_by_accumulation_steps_and_ranks():
    class Engine:                                 # records what DeepSpeed's engine.backward would get
        dp_world_size = 4

        def backward(self, loss, scale_wrt_gas=True):
            self.got = (loss.item(), scale_wrt_gas)

    engine = Engine()
    backward(engine, torch.tensor(0.25))
    assert engine.got == (1.0, False)             # x world size (DeepSpeed averages over ranks), no / grad_accum


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
