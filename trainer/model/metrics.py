"""WER and CER (jiwer) after one documented text normalisation, with raw error counts so that
ranks can all-reduce errors and reference lengths and get the corpus-level rates.

Normalisation (applied to references and hypotheses alike):
  1. Unicode NFKC, lowercase;
  2. every character that is not a letter, a digit, an apostrophe or whitespace becomes a space
     (so "don't" stays one word, "well-known" becomes two, "end." becomes "end");
  3. whitespace runs collapse to one space; leading/trailing space is removed.
CER is computed on the normalised strings, spaces included (jiwer's character alignment).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
import torch

_NOT_KEPT = re.compile(r"[^\w\s']|_")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = _NOT_KEPT.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


@dataclass
class ErrorCounts:
    word_errors: int = 0
    """Substitutions + deletions + insertions over words."""
    ref_words: int = 0
    char_errors: int = 0
    """Substitutions + deletions + insertions over characters."""
    ref_chars: int = 0
    utterances: int = 0

    @property
    def wer(self) -> float:
        return self.word_errors / max(self.ref_words, 1)

    @property
    def cer(self) -> float:
        return self.char_errors / max(self.ref_chars, 1)

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple())))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.word_errors, self.ref_words, self.char_errors, self.ref_chars, self.utterances)

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 [5] for torch.distributed.all_reduce(SUM)."""
        return torch.tensor(self.as_tuple(), dtype=torch.long, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "ErrorCounts":
        return cls(*(int(x) for x in t.tolist()))


def _errors(out) -> int:
    return out.substitutions + out.deletions + out.insertions


def utterance_counts(references: Sequence[str], hypotheses: Sequence[str]) -> list[ErrorCounts]:
    """Error counts of each utterance: what a bootstrap over utterances resamples (trainer/stats.py).
    Their sum is the corpus's counts (`error_counts`)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    out = []
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_text(ref), normalize_text(hyp)
        if not r:          # jiwer rejects empty references: an empty reference only has insertions
            out.append(ErrorCounts(word_errors=len(h.split()), char_errors=len(h), utterances=1))
            continue
        out.append(ErrorCounts(word_errors=_errors(jiwer.process_words(r, h)), ref_words=len(r.split()),
                               char_errors=_errors(jiwer.process_characters(r, h)), ref_chars=len(r),
                               utterances=1))
    return out


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorCounts:
    return sum(utterance_counts(references, hypotheses), ErrorCounts())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    return error_counts(references, hypotheses).wer


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    return error_counts(references, hypotheses).cer
