"""Greedy and beam-search decoding through transformers' generate on input embeddings."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from .prompt import AssembledInputs
from .tokenizer import SpecialTokenIds


@dataclass
class DecodingConfig:
    num_beams: int = 1
    """1 = greedy; the paper decodes with 15 beams."""
    max_new_tokens: int = 32
    """Cap on generated tokens (the paper: 32)."""
    length_penalty: float = 1.0
    """Beam-search length normalisation exponent (transformers' default)."""
    synced_gpus: bool = False
    """Keep all ranks stepping until every rank is done (required under ZeRO-3)."""


def suppressed_token_ids(specials: SpecialTokenIds) -> list[int]:
    """Tokens the model must never emit: BOS, pad and the delimiters (only ever inputs)."""
    return sorted({specials.bos, specials.pad, *specials.delimiters} - {specials.eos})


def cut_at_eos(ids: Sequence[int], eos: int) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


@torch.no_grad()
def generate_ids(llm, specials: SpecialTokenIds, prompt: AssembledInputs, decoding: DecodingConfig) -> list[list[int]]:
    """prompt: a left-padded generation prompt. Returns the new token ids of each sample, cut at EOS
    (text: trainer.model.prompt_text.decode_transcripts).

    Given inputs_embeds and no input_ids, a decoder-only generate returns only the new tokens."""
    if decoding.num_beams < 1 or decoding.max_new_tokens < 1:
        raise ValueError(f"need num_beams >= 1 and max_new_tokens >= 1, got {decoding}")
    out = llm.generate(
        inputs_embeds=prompt.inputs_embeds,
        attention_mask=prompt.attention_mask,
        num_beams=decoding.num_beams,
        num_return_sequences=1,
        do_sample=False,
        max_new_tokens=decoding.max_new_tokens,
        length_penalty=decoding.length_penalty,
        early_stopping=True if decoding.num_beams > 1 else False,
        eos_token_id=specials.eos,
        pad_token_id=specials.pad,
        bos_token_id=specials.bos,
        suppress_tokens=suppressed_token_ids(specials),
        synced_gpus=decoding.synced_gpus,
        use_cache=True,
    )
    sequences = out.sequences if hasattr(out, "sequences") else out
    return [cut_at_eos(row.tolist(), specials.eos) for row in sequences]
