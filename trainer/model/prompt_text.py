"""Text <-> token ids of the prompt, done by the caller: the model itself never sees a tokenizer.

The model is built with the fixed ids of its prompt (`PromptIds`: special tokens, instruction) and
reads each transcript's ids from the batch (`batch["transcript_ids"]`); generation returns ids. So
the trainer, the evaluation, the sink probe and the offline tools tokenize with these functions,
and the model can be built and run where no tokenizer is, e.g. on the meta device to count its
FLOPs (bench/estimate_lrs3.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .prompt import INSTRUCTIONS
from .tokenizer import SpecialTokenIds, encode_text, special_token_ids


@dataclass(frozen=True)
class PromptIds:
    """The ids every prompt of a model shares."""
    specials: SpecialTokenIds
    instruction: tuple[int, ...]
    """The modality's instruction ("Transcribe speech to text."), no BOS/EOS."""


def prompt_ids(tokenizer, modality: str) -> PromptIds:
    return PromptIds(special_token_ids(tokenizer),
                     tuple(tokenizer(INSTRUCTIONS[modality], add_special_tokens=False)["input_ids"]))


def with_transcript_ids(tokenizer, batch: dict) -> dict:
    """The batch plus "transcript_ids": each transcript's ids (no BOS/EOS), what the model trains on."""
    return {**batch, "transcript_ids": [encode_text(tokenizer, t) for t in batch["text"]]}


def decode_transcripts(tokenizer, rows: Sequence[Sequence[int]]) -> list[str]:
    """Generated ids (cut at EOS) -> one stripped string per sample."""
    return [tokenizer.decode(list(row), skip_special_tokens=True).strip() for row in rows]
