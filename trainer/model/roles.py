"""Token roles in the Llama-AVSR prompt.

The model's input assembly tags every position with one of these roles; the
decorrelation loss uses them to pick the prefix, and the sink monitor to tell
BOS sinks from intermediate ones and to report sinks by role.
"""
from enum import IntEnum

import torch


class TokenRole(IntEnum):
    PAD = 0
    BOS = 1
    DELIMITER = 2      # <audio> </audio> <video> </video>
    AUDIO = 3          # projected audio-encoder frames
    VIDEO = 4          # projected video-encoder frames
    INSTRUCTION = 5    # "Transcribe speech to text." ...
    TRANSCRIPT = 6     # target text tokens
    EOS = 7


ROLE_NAMES = {role.value: role.name.lower() for role in TokenRole}

# Roles that form the decorrelation prefix: everything after BOS and before the transcript.
PREFIX_ROLES = (TokenRole.DELIMITER, TokenRole.AUDIO, TokenRole.VIDEO, TokenRole.INSTRUCTION)


def prefix_mask(token_roles: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T] of the tokens whose similarity to BOS the decorrelation loss penalises."""
    mask = torch.zeros_like(token_roles, dtype=torch.bool)
    for role in PREFIX_ROLES:
        mask |= token_roles == role
    return mask
