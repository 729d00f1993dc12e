"""Pure-PyTorch reference of the decorrelation loss (DESIGN.md section 3).

    L_dec_raw = mean_l [ sum_{b,s: M[b,s]} cos^2(H^l[b,0], H^l[b,s]) / sum(M) ]
    cos(x, y) = x.y / (max(||x||, eps) * max(||y||, eps))

This is the specification the Triton kernel is tested against: clear and
autograd-differentiable, not memory-efficient (it makes fp32 copies of H).

Conventions shared with the kernel:
- eps = 1e-8 clamps each norm separately (as written above). torch's
  F.cosine_similarity clamps the product of the norms instead; the two agree
  except for rows whose norm is below eps.
- Position 0 is BOS and is never penalised: M[:, 0] is ignored.
- sum(M) == 0 gives a loss of zero that still has a grad path (division by
  max(sum(M), 1)), without a host-device sync.
"""
from collections.abc import Sequence

import torch

EPS = 1e-8


def as_layers(hidden_states: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A [L, B, T, D] tensor or a sequence of L [B, T, D] tensors -> list of [B, T, D] views."""
    if isinstance(hidden_states, torch.Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(f"expected [L, B, T, D], got shape {tuple(hidden_states.shape)}")
        return list(hidden_states.unbind(0))
    layers = list(hidden_states)
    if not layers:
        raise ValueError("no layers given")
    first = layers[0]
    for h in layers:
        if h.dim() != 3 or h.shape != first.shape or h.dtype != first.dtype or h.device != first.device:
            raise ValueError("every layer must be [B, T, D] with the same shape, dtype and device")
    return layers


def decorrelation_loss_reference(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    prefix_mask: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """Scalar (fp32, or fp64 for fp64 input): mean over layers of the masked mean of cos^2(BOS, token)."""
    layers = as_layers(hidden_states)
    B, T, _ = layers[0].shape
    if prefix_mask.shape != (B, T):
        raise ValueError(f"prefix_mask {tuple(prefix_mask.shape)} does not match hidden states [B={B}, T={T}]")
    acc = torch.promote_types(layers[0].dtype, torch.float32)  # fp32 at least; fp64 kept for gradcheck
    m = prefix_mask[:, 1:].to(device=layers[0].device, dtype=acc)
    total = layers[0].new_zeros((), dtype=acc)
    for h in layers:
        h = h.to(acc)
        bos, rest = h[:, :1], h[:, 1:]
        dots = (rest * bos).sum(-1)                                   # [B, T-1]
        n0 = torch.linalg.vector_norm(bos, dim=-1).clamp_min(eps)    # [B, 1]
        ns = torch.linalg.vector_norm(rest, dim=-1).clamp_min(eps)   # [B, T-1]
        total = total + ((dots / (n0 * ns)).square() * m).sum()
    return total / (len(layers) * m.sum().clamp_min(1.0))
