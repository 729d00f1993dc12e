"""Modality projectors: encoder frames -> LLM-width tokens, downsampled by a rate k.

Remainder handling (a length that is not a multiple of k): the output has ceil(len / k) tokens;
the last token of a sample covers the leftover len % k frames only.
- "stack": frames past the sample's length are zeroed before stacking, so the last token sees
  its real frames followed by zeros (never the encoder's outputs on padding).
- "avgpool": the last token is the mean of its real frames only (masked mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def downsampled_lengths(lengths: torch.Tensor, rate: int) -> torch.Tensor:
    """Tokens per sample after merging `rate` frames per token: ceil(lengths / rate)."""
    return torch.div(lengths + rate - 1, rate, rounding_mode="floor")


def frame_mask(lengths: torch.Tensor, max_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool [B, max_len] on `device` (default: the lengths'): True on real (non-padding) frames.
    Lengths may live on the CPU while the data is elsewhere (on the meta device, where the
    prompt's layout could not read them)."""
    mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
    return mask if device is None else mask.to(device)


class Projector(nn.Module):
    """Downsample by `rate`, then Linear(in, hidden) -> ReLU -> Linear(hidden, d_llm) [-> LayerNorm]."""

    def __init__(self, in_dim: int, llm_dim: int, rate: int, mode: str = "stack",
                 hidden: int = 2048, layernorm: bool = False):
        super().__init__()
        if mode not in ("stack", "avgpool"):
            raise ValueError(f"unknown downsample mode {mode!r}")
        self.rate = rate
        self.mode = mode
        merged_dim = in_dim * rate if mode == "stack" else in_dim
        self.fc1 = nn.Linear(merged_dim, hidden)
        self.fc2 = nn.Linear(hidden, llm_dim)
        self.norm = nn.LayerNorm(llm_dim) if layernorm else None

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, T, D_in], lengths [B] -> (tokens [B, ceil(T/k), d_llm], token lengths [B])."""
        merged = self.downsample(frames, lengths)
        x = self.fc2(F.relu(self.fc1(merged)))
        if self.norm is not None:
            x = self.norm(x)
        return x, downsampled_lengths(lengths, self.rate)

    def downsample(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, D = frames.shape
        k = self.rate
        n_out = -(-T // k)
        valid = frame_mask(lengths, T, frames.device).to(frames.dtype)[..., None]                 # [B, T, 1]
        pad = n_out * k - T
        x = F.pad(frames * valid, (0, 0, 0, pad)).view(B, n_out, k, D)
        if self.mode == "stack":
            return x.reshape(B, n_out, k * D)
        counts = F.pad(valid, (0, 0, 0, pad)).view(B, n_out, k, 1).sum(2)
        return x.sum(2) / counts.clamp_min(1.0)
