"""Small, real WebDataset shards for tests: the tone corpus of data_tools/tones.py, plus a writer of
hand-made (often deliberately broken) samples.

Media are encoded by the project's own encoders (data_tools.media) and indexed with the shard
format's ShardIndex, so tests exercise the same decoders as real data.
"""
from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import webdataset as wds

from data_tools.tones import build_tone_corpus, tone_clip, tone_sample
from trainer.data.shard_format import AUDIO_KEYS, ShardIndex, ShardInfo, shard_name

make_clip = tone_clip      # (video, audio) that go together; see data_tools/tones.py


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def make_sample(key: str, frames: int, *, size: int = 96, rgb: bool = False, seed: int = 0,
                text: str | None = None, split: str = "train") -> dict:
    """A tone clip as the WebDataset dict a shard holds (`__key__`, wav, mp4, txt, json)."""
    return tone_sample(key, frames, size=size, rgb=rgb, seed=seed, text=text, split=split).to_wds()


def sample_duration(sample: dict) -> float:
    """Seconds of audio in a sample (0 when it has none or it does not decode)."""
    for k in AUDIO_KEYS:
        if k in sample:
            try:
                info = sf.info(io.BytesIO(sample[k]))
                return info.frames / info.samplerate
            except Exception:
                return 0.0
    return 0.0


def write_shards(folder: str | os.PathLike, split: str, shards: list[list[dict]]) -> ShardIndex:
    """Write one tar per list of samples as given (broken ones too: data_tools' writer would refuse
    them), plus `{split}.index.json`; returns the index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, samples in enumerate(shards):
        name = shard_name(split, i)
        with wds.TarWriter(str(folder / name)) as sink:
            for s in samples:
                sink.write(s)
        infos.append(ShardInfo(name=name, samples=len(samples),
                               duration=round(sum(sample_duration(s) for s in samples), 3)))
    index = ShardIndex(split=split, shards=infos, meta={"writer": "tests/support/data_fixtures.py"}, root=folder)
    index.save(folder)
    return index


@dataclass
class Corpus:
    folder: Path
    keys: dict[str, list[str]]      # split -> sample keys, in shard order


def make_corpus(folder: str | os.PathLike, splits: dict[str, tuple[int, int]], **kwargs) -> Corpus:
    """splits: name -> (num_shards, samples_per_shard); kwargs as data_tools.tones.build_tone_corpus."""
    return Corpus(folder=Path(folder), keys=build_tone_corpus(folder, splits, **kwargs))
