"""Tokenizers: a pretrained LLM's (local folder), or a small one trained here with `tokenizers`.

Either way the AVSR special tokens are present afterwards: a pad token and the modality
delimiters <audio> </audio> <video> </video>, plus BOS and EOS.
"""
from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
AUDIO_START, AUDIO_END, VIDEO_START, VIDEO_END = "<audio>", "</audio>", "<video>", "</video>"
DELIMITERS = (AUDIO_START, AUDIO_END, VIDEO_START, VIDEO_END)

# Characters a trained tokenizer always knows (after lowercasing), so any English transcript
# and the instructions tokenize without <unk>.
BASE_ALPHABET = string.ascii_lowercase + string.digits + " '.,?!-:;\"()"


@dataclass(frozen=True)
class SpecialTokenIds:
    bos: int
    eos: int
    pad: int
    audio_start: int
    audio_end: int
    video_start: int
    video_end: int

    @property
    def delimiters(self) -> tuple[int, int, int, int]:
        """In the order of the model's delimiter embedding table."""
        return (self.audio_start, self.audio_end, self.video_start, self.video_end)

    def block(self, modality: str) -> tuple[int, int]:
        """(start, end) delimiter ids of a modality block."""
        return {"audio": (self.audio_start, self.audio_end), "video": (self.video_start, self.video_end)}[modality]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A lowercasing BPE tokenizer (SentencePiece-style "▁" word boundaries) trained on `texts`.
    vocab_size counts everything; a vocab no larger than specials + alphabet gives a character tokenizer."""
    specials = [PAD, BOS, EOS, UNK, *DELIMITERS]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted(set(BASE_ALPHABET.replace(" ", "")) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size, len(specials) + len(alphabet)),
                                  special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def character_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer needing no corpus (the default for the tiny LLM)."""
    return train_bpe_tokenizer([BASE_ALPHABET], vocab_size=0)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def add_avsr_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add pad (when missing) and the four delimiters as special tokens; BOS/EOS must exist."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs both a BOS and an EOS token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # A pad distinct from EOS: padding must never be mistaken for the end of a transcript.
        tokenizer.add_special_tokens({"pad_token": PAD})
    missing = [t for t in DELIMITERS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokenIds:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in
           (("audio_start", AUDIO_START), ("audio_end", AUDIO_END),
            ("video_start", VIDEO_START), ("video_end", VIDEO_END))}
    bad = [n for n, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if bad:
        raise ValueError(f"tokenizer lacks the delimiter tokens {bad}: call add_avsr_special_tokens first")
    return SpecialTokenIds(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, **ids)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a plain text piece, no BOS/EOS. A leading space makes a transcript's first word
    tokenize as a word continuing the prompt (byte-level BPE), and is a no-op for "▁" tokenizers."""
    return tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
