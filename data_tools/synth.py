"""The synthetic corpus (DESIGN.md section 5): GRID-style sentences spoken by espeak-ng,
with a 25 fps mouth-region video that follows the speech.

Everything is a function of the seed: the sentences, their train/val/test split (by
sentence: a sentence never appears in two splits), the speakers (voice, speed, pitch,
face) and every random draw of the renderer. espeak-ng and ffmpeg are deterministic,
so the same seed gives byte-identical shards on the same machine.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from trainer.data.shard_format import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, ShardIndex, fit_length, resample
from trainer.data.storage import redact

from .command import run_command
from .media import MediaError, encode_mp4, encode_mp4_batch, encode_wav
from .mouth import Face, align_visemes, frame_envelope, mouth_track, parse_phonemes, render
from .shards import DEFAULT_MAX_BYTES, Sample, SplitSpec, write_splits

# GRID (Cooke et al. 2006): command colour preposition letter digit adverb
GRID_WORDS: tuple[tuple[str, ...], ...] = (
    ("bin", "lay", "place", "set"),
    ("blue", "green", "red", "white"),
    ("at", "by", "in", "with"),
    tuple(c for c in "abcdefghijklmnopqrstuvxyz"),          # a-z without w, as in GRID
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    ("again", "now", "please", "soon"),
)
GRID_SIZE = math.prod(len(w) for w in GRID_WORDS)     # 64000 sentences
SPLITS = ("train", "val", "test")
# Small shards for a small corpus: more shards than ranks x loader workers, and more parallel work.
DEFAULT_SAMPLES_PER_SHARD = 25
# espeak-ng voices (language + variant) that exist in espeak-ng 1.51's default data
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-gb-scotland", "en-us+f2",
          "en-029", "en-gb-x-rp+f4", "en-us+m7", "en-gb-x-gbclan+f5")


def grid_sentence(index: int) -> str:
    """The index-th sentence of the grammar (mixed radix), 0 <= index < GRID_SIZE."""
    if not 0 <= index < GRID_SIZE:
        raise ValueError(f"GRID sentence index {index} out of range [0, {GRID_SIZE})")
    words = []
    for options in reversed(GRID_WORDS):
        index, r = divmod(index, len(options))
        words.append(options[r])
    return " ".join(reversed(words))


@dataclass(frozen=True)
class Speaker:
    id: str
    voice: str           # espeak-ng -v
    speed: int           # words per minute (espeak-ng -s), varied a little per utterance
    pitch: int           # espeak-ng -p, 0..99
    face: Face


@dataclass(frozen=True)
class Utterance:
    """One item to synthesise; picklable, so it travels to the worker processes."""
    key: str
    text: str
    sentence_id: int     # index into the corpus's sentence list
    split: str
    speaker: Speaker
    speed: int
    seed: tuple[int, ...]  # renderer randomness

    @property
    def estimated_bytes(self) -> int:
        # for shard planning only, calibrated on GRID sentences: espeak-ng speaks ~1.4x faster than
        # its nominal words per minute; ~32 kB/s of PCM16 + ~14 kB/s of mp4
        seconds = 0.3 + 0.7 * len(self.text.split()) * 60.0 / self.speed
        return int(seconds * 46_000) + 4096


@dataclass
class CorpusPlan:
    sentences: list[str]
    sentence_split: dict[int, str]         # sentence id -> split
    speakers: list[Speaker]
    utterances: dict[str, list[Utterance]] = field(default_factory=dict)


def make_speakers(seed: int, num_speakers: int) -> list[Speaker]:
    rng = np.random.default_rng([seed, 1])
    return [Speaker(id=f"s{k:02d}", voice=VOICES[k % len(VOICES)], speed=int(rng.integers(135, 186)),
                    pitch=int(rng.integers(30, 71)), face=Face.random(rng)) for k in range(num_speakers)]


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sentence counts; a split with a positive fraction gets at least one sentence."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError(f"val/test fractions must be in [0, 1), got {val_fraction}, {test_fraction}")
    n_val = max(round(n * val_fraction), 1 if val_fraction > 0 else 0)
    n_test = max(round(n * test_fraction), 1 if test_fraction > 0 else 0)
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} sentences are too few for val={val_fraction}, test={test_fraction} and a train split")
    return n - n_val - n_test, n_val, n_test


def plan_corpus(num_utterances: int, seed: int, sentences: Sequence[str] | None = None, *,
                num_speakers: int = 8, val_fraction: float = 0.1, test_fraction: float = 0.1) -> CorpusPlan:
    """Decide every utterance (text, speaker, split, key) from the seed, before any synthesis.

    Without `sentences`, num_utterances distinct GRID sentences are drawn (each spoken once).
    With `sentences`, utterance i speaks sentence i mod len(sentences) (after a seeded shuffle),
    by a random speaker, so a sentence list can be spoken several times.
    """
    if num_utterances < 3:
        raise ValueError(f"num_utterances must be >= 3 (one per split), got {num_utterances}")
    if num_speakers < 1:
        raise ValueError(f"num_speakers must be >= 1, got {num_speakers}")
    rng = np.random.default_rng([seed, 0])
    if sentences is None:
        picks = rng.choice(GRID_SIZE, size=min(num_utterances, GRID_SIZE), replace=False)
        sents = [grid_sentence(int(i)) for i in picks]
    else:
        sents = list(dict.fromkeys(s.strip() for s in sentences if s.strip()))   # dedupe, keep order
        if not sents:
            raise ValueError("the sentence list is empty")
        sents = [sents[i] for i in rng.permutation(len(sents))]
    n_train, n_val, n_test = split_sizes(len(sents), val_fraction, test_fraction)
    labels = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * n_test)
    labels = labels[rng.permutation(len(labels))]
    plan = CorpusPlan(sentences=sents, sentence_split={i: str(s) for i, s in enumerate(labels)},
                      speakers=make_speakers(seed, num_speakers), utterances={s: [] for s in SPLITS})
    for i in range(num_utterances):
        sid = i % len(sents)
        spk = plan.speakers[int(rng.integers(num_speakers))]
        split = plan.sentence_split[sid]
        plan.utterances[split].append(Utterance(
            key=f"{spk.id}_{i:06d}", text=sents[sid], sentence_id=sid, split=split, speaker=spk,
            speed=int(np.clip(spk.speed + rng.integers(-12, 13), 80, 450)), seed=(seed, 2, i)))
    return plan


def espeak(text: str, voice: str, speed: int, pitch: int, wav_path: Path) -> str:
    """Speak `text` into wav_path; returns the phonemes espeak-ng reports (-x, '_'-separated)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MediaError("`espeak-ng` not found on PATH; install it (Debian: apt-get install -y espeak-ng)")
    proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-x", "--sep=_",
                           "-w", str(wav_path), "--", text], capture_output=True, text=True)  # "--": "-5 ..." is text
    if proc.returncode != 0 or not wav_path.is_file():
        raise MediaError(f"espeak-ng failed for {text!r} (voice {voice}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class Rendered:
    """An utterance's audio and frames, before video encoding."""
    utt: Utterance
    audio16: np.ndarray
    frames: np.ndarray
    meta: dict


def render_utterance(utt: Utterance) -> Rendered:
    """Speech (16 kHz, exactly 640 samples per frame), mouth frames and metadata for one utterance."""
    spk = utt.speaker
    with tempfile.TemporaryDirectory(prefix="avsr-synth-") as tmp:
        wav_path = Path(tmp) / "speech.wav"
        phonemes = espeak(utt.text, spk.voice, utt.speed, spk.pitch, wav_path)
        audio, sr = sf.read(wav_path, dtype="float32")        # espeak-ng: 22.05 kHz mono
    num_frames = max(1, math.ceil(len(audio) / sr * FPS))
    envelope = frame_envelope(audio, sr, num_frames, FPS)
    visemes = align_visemes(parse_phonemes(phonemes), envelope)
    rng = np.random.default_rng(list(utt.seed))
    frames = render(mouth_track(envelope, visemes, spk.face), spk.face, rng)
    audio16 = fit_length(resample(audio, sr, SAMPLE_RATE), num_frames * SAMPLES_PER_FRAME)
    meta = {"speaker": spk.id, "duration": round(num_frames / FPS, 3), "num_frames": num_frames, "fps": FPS,
            "sample_rate": SAMPLE_RATE, "source": f"synth:{utt.sentence_id}", "dataset": "synth", "split": utt.split,
            "voice": spk.voice, "speed": utt.speed, "pitch": spk.pitch, "phonemes": " ".join(phonemes.split()),
            "visemes": visemes}
    return Rendered(utt=utt, audio16=audio16, frames=frames, meta=meta)


def _to_sample(r: Rendered, mp4: bytes) -> Sample:
    return Sample(key=r.utt.key, wav=encode_wav(r.audio16), mp4=mp4, txt=r.utt.text, meta=r.meta)


@dataclass(frozen=True)
class Synthesizer:
    """The shard writer's producer: utterances -> Samples, videos encoded batch_size at a time."""
    batch_size: int = 16

    def __call__(self, utt: Utterance) -> Sample:
        r = render_utterance(utt)
        return _to_sample(r, encode_mp4(r.frames, FPS))

    def produce_batch(self, utts: list[Utterance]) -> list[Sample]:
        rendered = [render_utterance(u) for u in utts]
        videos = encode_mp4_batch([r.frames for r in rendered], FPS)
        return [_to_sample(r, mp4) for r, mp4 in zip(rendered, videos)]


def synthesize(utt: Utterance) -> Sample:
    """One utterance -> Sample (speech, mouth video, transcript, metadata)."""
    return Synthesizer()(utt)


def build_corpus(out_dir: str | os.PathLike, num_utterances: int, seed: int = 0, *,
                 sentences: Sequence[str] | None = None, num_speakers: int = 8, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, workers: int | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 samples_per_shard: int | None = DEFAULT_SAMPLES_PER_SHARD, overwrite: bool = False,
                 progress: bool = True) -> dict[str, ShardIndex]:
    """Synthesise the corpus into `{out_dir}/{split}-NNNNNN.tar` + `{split}.index.json` for train/val/test."""
    plan = plan_corpus(num_utterances, seed, sentences, num_speakers=num_speakers,
                       val_fraction=val_fraction, test_fraction=test_fraction)
    workers = (os.cpu_count() or 1) if workers is None else workers
    options = {"tool": "data_tools.synth", "seed": seed, "num_utterances": num_utterances,
               "num_speakers": num_speakers, "val_fraction": val_fraction, "test_fraction": test_fraction,
               "sentences": "grid" if sentences is None else "custom", "num_sentences": len(plan.sentences)}
    specs = [SplitSpec(split, plan.utterances[split], [u.estimated_bytes for u in plan.utterances[split]],
                       {**options, "dataset": "synth"}) for split in SPLITS]
    results = write_splits(specs, Synthesizer(), out_dir, max_bytes=max_bytes, max_samples=samples_per_shard,
                           workers=workers, overwrite=overwrite, progress=progress)
    return {split: r.index for split, r in results.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True,
                   help="output folder, or s3://bucket/prefix, for the shards and their indexes")
    p.add_argument("--num", type=int, default=300, help="number of utterances over all splits (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed for sentences, split, speakers and rendering")
    p.add_argument("--sentences", type=Path, default=None,
                   help="text file with one sentence per line, instead of the GRID grammar")
    p.add_argument("--speakers", type=int, default=8, help="number of synthetic speakers (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of sentences in val (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of sentences in test (default 0.1)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_MAX_BYTES,
                   help="max shard size in bytes, from estimated sample sizes (default 1e9)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                   help=f"max samples per shard; 0: no limit (default {DEFAULT_SAMPLES_PER_SHARD})")
    p.add_argument("--overwrite", action="store_true", help="replace shards and indexes already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import time
    sentences = None
    if args.sentences is not None:
        sentences = args.sentences.read_text(encoding="utf-8").splitlines()
    t0 = time.perf_counter()
    indexes = build_corpus(args.out, args.num, args.seed, sentences=sentences, num_speakers=args.speakers,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, workers=args.workers,
                           max_bytes=args.shard_size, samples_per_shard=args.samples_per_shard or None,
                           overwrite=args.overwrite, progress=not args.quiet)
    for split, idx in indexes.items():
        print(f"{split:5s}: {idx.num_samples:6d} utterances, {idx.duration / 60:7.2f} min, {len(idx.shards)} shards")
    print(f"wrote {redact(args.out)} in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="avsr-synth", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_command(sys.modules[__name__], p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
