"""CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json) -> a transformers Whisper folder,
and a transcription check of the result on synthetic speech.

The folder holds WhisperForConditionalGeneration (encoder and decoder, fp32 safetensors), its
tokenizer (CTranslate2 ships the same `tokenizer.json` as the original checkpoint), the standard
feature extractor (80 or 128 mel bins, 30 s window) and a generation config for English-only
greedy transcription without timestamps.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import torch

from .ctranslate2_whisper import read_ctranslate2, whisper_state_dict

SPECIAL = {"eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "no_timestamps": "<|notimestamps|>",
           "transcribe": "<|transcribe|>", "translate": "<|translate|>", "prev": "<|startofprev|>",
           "lm": "<|startoflm|>", "no_speech": "<|nocaptions|>"}


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_json.read_text())["added_tokens"]}
    missing = [v for v in SPECIAL.values() if v not in added]
    if missing:
        raise ValueError(f"{tokenizer_json}: not a Whisper tokenizer (no {missing})")
    return {k: added[v] for k, v in SPECIAL.items()}


def convert_ctranslate2_whisper(src: Path, out_dir: Path) -> dict:
    """src: folder with model.bin, config.json (CTranslate2's: suppress ids) and tokenizer.json."""
    from transformers import (GenerationConfig, PreTrainedTokenizerFast, WhisperConfig,
                              WhisperFeatureExtractor, WhisperForConditionalGeneration)

    src = Path(src)
    state, dims = whisper_state_dict(read_ctranslate2(src / "model.bin"))
    ct2_config = json.loads((src / "config.json").read_text())
    ids = _token_ids(src / "tokenizer.json")
    english_only = dims["vocab_size"] == 51864          # the ".en" models; multilingual ones have 51865+
    config = WhisperConfig(
        **dims, activation_function="gelu", scale_embedding=False,
        bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        suppress_tokens=ct2_config.get("suppress_ids", []),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, ids["eot"]]),
    )
    model = WhisperForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "proj_out.weight" and dims["tie_word_embeddings"])]
    if missing or unexpected:
        raise ValueError(f"{src / 'model.bin'}: does not fit WhisperForConditionalGeneration "
                         f"(missing {missing[:10]}, unexpected {unexpected[:10]})")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        forced_decoder_ids=[[1, ids["no_timestamps"]]], no_timestamps_token_id=ids["no_timestamps"],
        suppress_tokens=config.suppress_tokens, begin_suppress_tokens=config.begin_suppress_tokens,
        max_length=dims["max_target_positions"], is_multilingual=not english_only,
        alignment_heads=ct2_config.get("alignment_heads"),
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"), bos_token=SPECIAL["eot"],
                                        eos_token=SPECIAL["eot"], unk_token=SPECIAL["eot"], pad_token=SPECIAL["eot"])
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(out_dir)
    return {"architecture": "whisper", **{k: v for k, v in dims.items()}, "english_only": english_only,
            "decoder_prompt": [ids["sot"], ids["no_timestamps"]], "eot": ids["eot"]}


class WhisperTranscriber:
    """Greedy transcription with a transformers Whisper folder (prompt: <|startoftranscript|>
    <|notimestamps|>; English-only models need no language or task token)."""

    def __init__(self, folder: Path, max_new_tokens: int = 64):
        from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

        self.model = WhisperForConditionalGeneration.from_pretrained(str(folder), local_files_only=True).eval()
        self.features = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        gen = self.model.generation_config
        self.prompt = [gen.decoder_start_token_id, gen.no_timestamps_token_id]
        self.eot = gen.eos_token_id
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, waves: list[np.ndarray]) -> list[str]:
        """Transcripts of 16 kHz waveforms, each encoded in Whisper's 30 s window (the standard way)."""
        mel = self.features(waves, sampling_rate=16000, return_tensors="pt").input_features
        return self.decode(self.model.model.encoder(input_features=mel).last_hidden_state)

    @torch.no_grad()
    def decode(self, enc: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """Greedy transcripts from encoder outputs [B, T, D]; with lengths, row i uses its first
        lengths[i] frames only (decoded one by one: the decoder has no encoder mask)."""
        if lengths is not None:
            return [self.decode(enc[i:i + 1, :n])[0] for i, n in enumerate(lengths.tolist())]
        tokens = torch.tensor([self.prompt] * enc.shape[0])
        done = torch.zeros(enc.shape[0], dtype=torch.bool)
        for _ in range(self.max_new_tokens):
            logits = self.model(encoder_outputs=(enc,), decoder_input_ids=tokens).logits[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, self.eot)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == self.eot
            if done.all():
                break
        return [self.tokenizer.decode([t for t in row[len(self.prompt):].tolist() if t != self.eot],
                                      skip_special_tokens=True).strip() for row in tokens]


def read_shard_speech(shard_dir: Path, split: str, limit: int) -> list[tuple[np.ndarray, str]]:
    """(16 kHz waveform, transcript) pairs from a shard set, in shard order."""
    import io

    import soundfile as sf

    out: list[tuple[np.ndarray, str]] = []
    for shard in sorted(Path(shard_dir).glob(f"{split}-*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("wav", "txt"):
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(samples):
            wav, rate = sf.read(io.BytesIO(samples[key]["wav"]), dtype="float32")
            if rate != 16000:
                raise ValueError(f"{shard}: {key}.wav is {rate} Hz, expected 16000")
            out.append((wav, samples[key]["txt"].decode("utf-8").strip()))
            if len(out) >= limit:
                return out
    return out


# GRID-style transcripts spell digits as words; Whisper writes "F2" or "2". Spell them back.
DIGIT_WORDS = "zero one two three four five six seven eight nine".split()


def spell_digits(text: str) -> str:
    import re

    return re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m.group())]} ", text)


def transcription_check(folder: Path, speech: list[tuple[np.ndarray, str]], batch: int = 8) -> dict:
    """WER/CER of the converted Whisper on (waveform, reference) pairs; digits spelled as words first."""
    from trainer.model.metrics import error_counts

    transcribe = WhisperTranscriber(folder)
    refs, hyps = [], []
    for i in range(0, len(speech), batch):
        chunk = speech[i:i + batch]
        hyps += transcribe([w for w, _ in chunk])
        refs += [t for _, t in chunk]
    counts = error_counts(refs, [spell_digits(h) for h in hyps])
    return {"utterances": len(refs), "wer": counts.wer, "cer": counts.cer,
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}
