"""The objective of one optimizer step: token means over the whole global batch.

A global batch is `grad_accum` micro-batches on each of the data-parallel ranks, and batches are
built to a frame budget, so one micro-batch may hold 2 clips and another 40. The objective is

    ce  = (sum of token cross-entropies over every micro-batch and rank) / (all target tokens)
    dec = (sum over every prefix token of its mean-over-layers cos^2 to BOS) / (all prefix tokens)
    loss = ce + decorrelation_weight * dec

so every target token counts the same whatever micro-batch or rank it lands in. As in torchtitan,
the token counts of all micro-batches of the step are all-reduced before the first backward; each
micro-batch then back-propagates its sums divided by those global counts. DeepSpeed divides the
loss by gradient_accumulation_steps in engine.backward (unless scale_wrt_gas=False) and averages
gradients over the data-parallel ranks; `backward` undoes both, so the gradient every rank applies
is the gradient of `loss` above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer import distributed

LOGGED = ("loss", "ce_loss", "dec_loss", "dec_loss_raw")


@dataclass
class GlobalCounts:
    targets: int
    """Target tokens (transcript + EOS) of the global batch."""
    prefix: int
    """Decorrelation-prefix tokens of the global batch."""

    @classmethod
    def all_reduced(cls, local: list[tuple[int, int]], device: torch.device) -> "GlobalCounts":
        """Sum of (targets, prefix) over this rank's micro-batches, then over ranks."""
        t = distributed.all_reduce_(torch.tensor([sum(a for a, _ in local), sum(b for _, b in local)],
                                                 dtype=torch.float64, device=device))
        return cls(targets=int(t[0].item()), prefix=int(t[1].item()))


def micro_batch_share(out, counts: GlobalCounts, expected: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step's objective (to back-propagate) and of each logged value,
    as a detached fp32 tensor in LOGGED order (summed over micro-batches and ranks they give the step's
    values). The weights come from `expected`, the counts computed on the host before the forward
    (LlamaAVSR.token_counts): reading the forward's own counts here would stop the host between forward
    and backward. `check_counts` compares the two after the backward."""
    n_targets, n_prefix = expected
    ce = out.ce_loss.float() * (n_targets / max(counts.targets, 1))     # ce_loss is this batch's token mean
    dec_weight = n_prefix / max(counts.prefix, 1)
    dec = out.dec_loss.float() * dec_weight                             # 0 when the weight is 0
    loss = ce + dec
    shares = torch.stack([loss, ce, dec, out.dec_loss_raw.float() * dec_weight]).detach()   # raw: NaN when not measured
    return loss, shares


def check_counts(out, expected: tuple[int, int]) -> None:
    """The forward's token counts must equal those the batch was weighted with. Called after the
    backward: reading them is a host sync."""
    got = (int(out.num_target_tokens), int(out.num_prefix_tokens))
    if got != tuple(expected):
        raise RuntimeError(f"token counts of the forward ({got[0]} targets, {got[1]} prefix) differ from "
                           f"those computed before it {tuple(expected)}: LlamaAVSR.token_counts is out of step "
                           f"with the prompt assembly")


def backward(ds_engine, loss: torch.Tensor) -> None:
    """engine.backward of a global-batch share: no division by gradient_accumulation_steps, and the
    data-parallel average (a division by the world size) compensated."""
    ds_engine.backward(loss * ds_engine.dp_world_size, scale_wrt_gas=False)
