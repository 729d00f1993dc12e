"""Prompt assembly: the one place where the LLM input sequence is laid out.

Training (right padding):
    BOS, <audio> A_1..A_m </audio>, <video> V_1..V_n </video>, instruction, transcript, EOS, PAD...
  (the paper's order by default; modality blocks in the configured order, only the enabled ones). Labels are the token ids on
  transcript and EOS positions and -100 elsewhere (aligned with the inputs: the loss shifts).
Generation (left padding, so every prompt ends at the last column and new tokens follow it):
    PAD..., BOS, modality blocks, instruction

Feature positions carry the pad id in `input_ids` (their embeddings come from the projectors),
delimiter positions carry the delimiter ids (embeddings from the model's trainable delimiter table).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .projector import frame_mask
from .roles import TokenRole
from .tokenizer import SpecialTokenIds

INSTRUCTIONS = {
    "asr": "Transcribe speech to text.",
    "vsr": "Transcribe video to text.",
    "avsr": "Transcribe speech and video to text.",
}

IGNORE_INDEX = -100
FEATURE_ROLES = {"audio": TokenRole.AUDIO, "video": TokenRole.VIDEO}


@dataclass
class AssembledInputs:
    inputs_embeds: torch.Tensor
    """[B, T, D] LLM input embeddings."""
    attention_mask: torch.Tensor
    """[B, T] long, 1 on real tokens."""
    labels: torch.Tensor
    """[B, T] token ids on transcript and EOS positions, -100 elsewhere (unshifted)."""
    token_roles: torch.Tensor
    """[B, T] long TokenRole values (PAD on padding)."""
    position_ids: torch.Tensor
    """[B, T] 0-based positions counted over real tokens (padding gets 0)."""
    input_ids: torch.Tensor
    """[B, T] token ids; the pad id on feature and padding positions."""
    predicting_positions: tuple[torch.Tensor, torch.Tensor]
    """(batch index, position) of each row whose hidden state predicts a target (transcript or EOS)
    token: labels[b, t + 1] != -100. Empty for a generation prompt."""
    target_ids: torch.Tensor
    """[N] the target token of each of those rows."""


@dataclass
class SampleLayout:
    """Ids and roles of one sample, before padding."""
    input_ids: list[int]
    roles: list[int]
    labels: list[int]


def layout_sample(specials: SpecialTokenIds, modality_lengths: Sequence[tuple[str, int]],
                  instruction_ids: Sequence[int], transcript_ids: Sequence[int] | None) -> SampleLayout:
    """transcript_ids None -> a generation prompt (no transcript, no EOS)."""
    ids, roles = [specials.bos], [TokenRole.BOS]

    def add(tokens: Sequence[int], role: TokenRole) -> None:
        ids.extend(tokens)
        roles.extend([role] * len(tokens))

    for modality, n in modality_lengths:
        start, end = specials.block(modality)
        add([start], TokenRole.DELIMITER)
        add([specials.pad] * n, FEATURE_ROLES[modality])
        add([end], TokenRole.DELIMITER)
    add(instruction_ids, TokenRole.INSTRUCTION)
    labels = [IGNORE_INDEX] * len(ids)
    if transcript_ids is not None:
        add(transcript_ids, TokenRole.TRANSCRIPT)
        add([specials.eos], TokenRole.EOS)
        labels += list(transcript_ids) + [specials.eos]
    return SampleLayout(ids, [int(r) for r in roles], labels)


def pad_layouts(layouts: Sequence[SampleLayout], pad_id: int, side: str):
    """-> input_ids, roles, labels, attention_mask, position_ids, all [B, T] long, on the CPU."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(len(x.input_ids) for x in layouts)

    def pad(seq: list[int], value: int) -> list[int]:
        fill = [value] * (T - len(seq))
        return seq + fill if side == "right" else fill + seq

    def tensor(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long)

    input_ids = tensor([pad(x.input_ids, pad_id) for x in layouts])
    roles = tensor([pad(x.roles, int(TokenRole.PAD)) for x in layouts])
    labels = tensor([pad(x.labels, IGNORE_INDEX) for x in layouts])
    attention_mask = tensor([pad([1] * len(x.input_ids), 0) for x in layouts])
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0) * attention_mask
    return input_ids, roles, labels, attention_mask, position_ids


def assemble(
    *,
    features: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    modality_order: Sequence[str],
    specials: SpecialTokenIds,
    instruction_ids: Sequence[int],
    transcripts: Sequence[Sequence[int]] | None,
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    embed_delimiters: Callable[[torch.Tensor], torch.Tensor],
) -> AssembledInputs:
    """Build the LLM inputs of a batch.

    features: modality -> (tokens [B, N, D], lengths [B]) from the projectors.
    transcripts: per-sample transcript ids (training, right padding) or None (generation, left padding).
    embed_tokens: ids [B, T] -> [B, T, D] (the LLM's input embedding).
    embed_delimiters: delimiter index [K] (0..3 in SpecialTokenIds.delimiters order) -> [K, D].

    The layout and every position index are computed on the CPU from the lengths' values, then moved
    to the features' device: no boolean indexing there (one sync fewer on a GPU; and on the meta
    device, where a boolean mask has no values, the same code runs to count FLOPs).
    """
    order = [m for m in modality_order if m in features]
    if set(order) != set(features):
        raise ValueError(f"features {sorted(features)} are not all in modality_order {tuple(modality_order)}")
    any_tokens = features[order[0]][0]
    B, device = any_tokens.shape[0], any_tokens.device
    if transcripts is not None and len(transcripts) != B:
        raise ValueError(f"{len(transcripts)} transcripts for a batch of {B}")
    lengths = {m: features[m][1].tolist() for m in order}
    layouts = [
        layout_sample(specials, [(m, lengths[m][b]) for m in order], instruction_ids,
                      None if transcripts is None else transcripts[b])
        for b in range(B)
    ]
    side = "left" if transcripts is None else "right"
    input_ids, roles, labels, attention_mask, position_ids = pad_layouts(layouts, specials.pad, side)

    def on_device(index: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(i.to(device) for i in index)

    embeds = embed_tokens(input_ids.to(device))
    at_delimiter = (roles == TokenRole.DELIMITER).nonzero(as_tuple=True)
    delimiter_index = torch.full((int(max(specials.delimiters)) + 1,), -1, dtype=torch.long)
    delimiter_index[list(specials.delimiters)] = torch.arange(4)
    delimiter_rows = embed_delimiters(delimiter_index[input_ids[at_delimiter]].to(device))
    embeds = embeds.index_put(on_device(at_delimiter), delimiter_rows.to(embeds.dtype))
    for m in order:
        tokens = features[m][0]
        # Row-major order visits each sample's feature slots in time order on both sides.
        real = frame_mask(torch.tensor(lengths[m]), tokens.shape[1]).nonzero(as_tuple=True)
        at_feature = (roles == FEATURE_ROLES[m]).nonzero(as_tuple=True)
        embeds = embeds.index_put(on_device(at_feature), tokens[on_device(real)].to(embeds.dtype))
    # Next-token targets: the hidden state at (b, t) predicts labels[b, t + 1].
    predicts = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    target_ids = labels[:, 1:][predicts]
    return AssembledInputs(embeds, attention_mask.to(device), labels.to(device), roles.to(device),
                           position_ids.to(device), input_ids.to(device), on_device(predicts),
                           target_ids.to(device))
