"""Copying a state dict into a module, whether or not ZeRO-3 has partitioned its parameters."""
from __future__ import annotations

import torch
from torch import nn

from trainer import distributed


def is_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 (zero.Init) owns the module's parameters."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise one clear error listing missing, unexpected and wrongly shaped keys."""
    expected = {k: _full_shape(v) for k, v in module.state_dict().items()}
    for k, p in module.named_parameters():       # ZeRO-3 empties param tensors; ds_shape has the real one
        expected[k] = _full_shape(p)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                   for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {unexpected[:20]}")
        if wrong:
            parts.append(f"shape mismatch {len(wrong)}: {wrong[:20]}")
        raise KeyError(f"{what}: state dict does not fit the model; " + "; ".join(parts))


@torch.no_grad()
def load_state_dict_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str = "module") -> None:
    """Strict load. Under ZeRO-3, parameters are gathered one module at a time and written on
    rank 0 (GatheredParameters re-partitions them on exit), so no rank holds the whole model."""
    check_state_dict(module, state, what)
    if not is_partitioned(module):
        module.load_state_dict(state, strict=True)
        return
    import deepspeed

    rank = distributed.rank()
    for prefix, sub in module.named_modules():
        dot = prefix + "." if prefix else ""
        params = list(sub.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    for name, p in params:
                        p.copy_(state[dot + name])
        for name, buf in sub.named_buffers(recurse=False):     # buffers are not partitioned
            if dot + name in state:
                buf.copy_(state[dot + name])
