"""The learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio` x lr at the last step.

The trainer builds it (a torch LambdaLR handed to deepspeed.initialize) unless the DeepSpeed JSON has
its own "scheduler" section. DeepSpeed's WarmupCosineLR is not used by default: it raises warmup to at
least 2 steps and starts from `warmup_min_ratio` x lr (0 in its defaults), so the first optimizer steps
trained at lr 0, and its default warmup is logarithmic.
"""
from __future__ import annotations

import functools
import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step taken after `step` completed steps.

    Warmup as in torchtitan: (step + 1) / (warmup_steps + 1), never 0; then the peak at step index
    `warmup_steps`, decaying on a cosine to `min_lr_ratio` at the last step (index total_steps - 1)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    """A LambdaLR over `optimizer`'s groups. The factor is a partial (its settings are not saved in
    checkpoints: the schedule always comes from the current config; the position is restored)."""
    return LambdaLR(optimizer, functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                                                 min_lr_ratio=min_lr_ratio))
