"""The objective of one optimizer step: token means over the whole global batch.

A global batch is `grad_accum` micro-batches on each of the data-parallel ranks, and batches are
built to a frame budget, so one micro-batch may hold 2 clips and another 40. The objective is

    ce  = (sum of token cross-entropies over every micro-batch and rank) / (all target tokens)
    dec = (sum over every prefix token of its mean-over-layers cos^2 to BOS) / (all prefix tokens)
    loss = ce + decorrelation_weight * ramp(step) * dec

where ramp(step) rises linearly to 1 over --model.decorrelation-warmup-steps (1 throughout without one).

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


def decorrelation_ramp(step: int, warmup_steps: int) -> float:
    """The share of lambda that optimizer step `step` (0-based) trains with: (step + 1) / warmup_steps up
    to 1, so the first step already has a small weight and step warmup_steps - 1 the full one."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


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


def objective_terms(out, counts: GlobalCounts, expected: tuple[int, int],
                    ramp: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's shares of the step's two terms, CE and lambda * ramp * L_dec, in fp32 with
    their graphs. The weights come from `expected`, the counts computed on the host before the forward
    (LlamaAVSR.token_counts): reading the forward's own counts here would stop the host between forward
    and backward. `check_counts` compares the two after the backward."""
    n_targets, n_prefix = expected
    ce = out.ce_loss.float() * (n_targets / max(counts.targets, 1))     # ce_loss is this batch's token mean
    dec = out.dec_loss.float() * (n_prefix / max(counts.prefix, 1) * ramp)   # 0 when the weight is 0
    return ce, dec


def micro_batch_share(out, counts: GlobalCounts, expected: tuple[int, int],
                      ramp: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step's objective (to back-propagate) and of each logged value,
    as a detached fp32 tensor in LOGGED order (summed over micro-batches and ranks they give the step's
    values). `ramp` scales the model's lambda * L_dec (decorrelation_ramp)."""
    ce, dec = objective_terms(out, counts, expected, ramp)
    loss = ce + dec
    raw = out.dec_loss_raw.float() * (expected[1] / max(counts.prefix, 1))     # NaN when not measured
    return loss, torch.stack([loss, ce, dec, raw]).detach()


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


def term_gradients(model, batch: dict, counts: GlobalCounts, expected: tuple[int, int],
                   ramp: float = 1.0) -> dict[str, torch.Tensor | None]:
    """d term / d trainable parameters for each term of this micro-batch's share of the objective ("ce" and
    "dec" = lambda * ramp * L_dec, `objective_terms`), each flattened into one fp32 vector; None for a term
    with no graph (lambda 0). A measuring forward of its own: the model runs with its trainable parameters
    swapped for detached leaves of the same values (torch.func.functional_call), and autograd.grad is
    taken w.r.t. those. The engine's forward and backward cannot be used: DeepSpeed hooks every backward
    of its parameters (and of its engine's outputs) to reduce and partition the gradients, so a bare
    autograd.grad there corrupts its bookkeeping. Not for ZeRO-3, whose parameters are empty outside its
    own forward. With dropout, this forward draws its own masks."""
    from torch.func import functional_call

    leaves = {n: p.detach().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    out = functional_call(model, leaves, (batch,), strict=False)
    terms = dict(zip(("ce", "dec"), objective_terms(out, counts, expected, ramp)))
    grads: dict[str, torch.Tensor | None] = {}
    params = list(leaves.values())
    for name, term in terms.items():
        if not term.requires_grad:
            grads[name] = None
            continue
        g = torch.autograd.grad(term, params, retain_graph=name != "dec", allow_unused=True)
        grads[name] = torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).float()
                                 for x, p in zip(g, params)])
    return grads


def term_grad_norms(gradients: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, float]:
    """The gradient norm of each term of the objective alone (before clipping): its gradient (the sum of
    `term_gradients` over the step's micro-batches) summed over ranks, as
    the engine's gradient is, then the 2-norm; 0 for a term without one. Costs one extra backward per
    term and micro-batch: the trainer measures it on log steps only. Every rank must call it (all-reduce)."""
    return {name: float(distributed.all_reduce_(g.to(device)).norm()) if g is not None else 0.0
            for name, g in gradients.items()}
