"""Short, readable labels for the probed tokens (figures, report.json and the printed summary).

Feature slots carry the pad id, so they are named by role and index (audio#3, video#0); every
other position by its tokenizer piece ('<s>', '<video>', 'Transcribe', '.').
"""
from __future__ import annotations

import torch

from trainer.model.roles import ROLE_NAMES, TokenRole


def token_labels(input_ids: torch.Tensor, roles: torch.Tensor, lengths: torch.Tensor, tokenizer) -> list[list[str]]:
    """Per sample, one label per real token."""
    out = []
    for row_ids, row_roles, n in zip(input_ids.tolist(), roles.tolist(), lengths.tolist()):
        labels, counts = [], {}
        for tok, role in zip(row_ids[:n], row_roles[:n]):
            if role in (TokenRole.AUDIO, TokenRole.VIDEO):
                name = ROLE_NAMES[role]
                labels.append(f"{name}#{counts.get(name, 0)}")
                counts[name] = counts.get(name, 0) + 1
            else:
                labels.append(str(tokenizer.convert_ids_to_tokens(int(tok))))
        out.append(labels)
    return out
