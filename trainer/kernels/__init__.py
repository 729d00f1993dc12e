"""Decorrelation loss between BOS and the prompt prefix (DESIGN.md section 3).

    decorrelation_loss(hidden_states, prefix_mask, impl="auto") -> fp32 scalar
    DecorrelationLoss(weight, impl)(hidden_states, prefix_mask) -> (weight * raw, raw)

hidden_states: a [L, B, T, D] tensor or a sequence of L [B, T, D] tensors (e.g.
`outputs.hidden_states[1:L]`), fp32 or bf16, any strides; prefix_mask: bool [B, T]
(trainer.model.roles.prefix_mask). The Triton module is imported lazily: triton reads
TRITON_INTERPRET when a kernel is decorated, so callers must be able to set it first.
"""
import os
from collections.abc import Sequence

import torch
from torch import nn

from .decorrelation_reference import EPS, decorrelation_loss_reference

IMPLS = ("auto", "triton", "torch")


def _first(hidden_states) -> torch.Tensor:
    return hidden_states if isinstance(hidden_states, torch.Tensor) else next(iter(hidden_states))


def resolve_impl(impl: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA or under TRITON_INTERPRET=1, else 'torch'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def decorrelation_loss(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    prefix_mask: torch.Tensor,
    impl: str = "auto",
    eps: float = EPS,
) -> torch.Tensor:
    """mean_l [ sum_{b,s: M[b,s]} cos^2(H^l[b,0], H^l[b,s]) / sum(M) ] as an fp32 scalar."""
    if resolve_impl(impl, _first(hidden_states).device) == "triton":
        from .decorrelation_triton import decorrelation_loss_triton
        return decorrelation_loss_triton(hidden_states, prefix_mask, eps)
    return decorrelation_loss_reference(hidden_states, prefix_mask, eps).float()


class DecorrelationLoss(nn.Module):
    """Returns (weight * raw, raw): the trainer adds the first and logs both."""

    def __init__(self, weight: float = 1e4, impl: str = "auto", eps: float = EPS):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.weight, self.impl, self.eps = weight, impl, eps

    def forward(self, hidden_states, prefix_mask) -> tuple[torch.Tensor, torch.Tensor]:
        raw = decorrelation_loss(hidden_states, prefix_mask, self.impl, self.eps)
        return self.weight * raw, raw

    def extra_repr(self) -> str:
        return f"weight={self.weight}, impl={self.impl!r}, eps={self.eps}"


__all__ = ["DecorrelationLoss", "decorrelation_loss", "decorrelation_loss_reference", "resolve_impl", "EPS"]
