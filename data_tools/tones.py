"""A tone corpus: quick shard sets of clips whose two modalities agree, for tests and benchmarks.

Each clip is a tone whose loudness swings slowly, with a "mouth" (a dark ellipse on a textured
skin) whose opening follows that loudness. No espeak-ng needed, any clip length, and some clips RGB
or 88x88, as in real shard sets, so a reader sees every kind of input the loader takes. Written by
the project's own encoders and shard writer, so it is decoded exactly like a real corpus.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from trainer.data.shard_format import FPS, SAMPLE_RATE

from .media import encode_mp4, encode_wav
from .shards import Sample, SplitSpec, write_splits

WORDS = ("place blue at f two now lay green by a one soon set red in b three please "
         "bin white with c four again").split()


def tone_clip(frames: int, *, size: int = 96, rgb: bool = False, seed: int = 0, sr: int = SAMPLE_RATE,
              freq: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(video uint8 [T, size, size(, 3)], audio float32 [frames * sr / 25]) that go together."""
    rng = np.random.default_rng(seed)
    n = int(frames * sr // FPS)
    t = np.arange(n) / sr
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (1.0 + seed % 3) * t)
    freq = freq or 200.0 + 40.0 * (seed % 7)
    audio = (0.3 * envelope * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(n)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    video = np.empty((frames, size, size), np.uint8)
    for i in range(frames):
        opening = envelope[min(n - 1, int(i * sr // FPS))]
        mouth = ((xx - size / 2) / (size / 4)) ** 2 + ((yy - size / 2) / (2 + size / 6 * opening)) ** 2 < 1
        img = 110 + 20 * np.sin(xx / 7.0 + i / 3.0) + rng.normal(0, 4, (size, size))
        img[mouth] = 30
        video[i] = np.clip(img, 0, 255).astype(np.uint8)
    if rgb:
        video = np.stack([video, (video * 0.9).astype(np.uint8), (video * 0.8).astype(np.uint8)], axis=-1)
    return video, audio


def tone_sample(key: str, frames: int, *, size: int = 96, rgb: bool = False, seed: int = 0,
                text: str | None = None, split: str = "train") -> Sample:
    video, audio = tone_clip(frames, size=size, rgb=rgb, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    text = text if text is not None else " ".join(rng.choice(WORDS, size=4))
    meta = {"speaker": f"spk{seed % 3}", "duration": len(audio) / SAMPLE_RATE, "num_frames": frames,
            "source": "data_tools/tones.py", "dataset": "tones", "split": split}
    return Sample(key=key, wav=encode_wav(audio), mp4=encode_mp4(video), txt=text, meta=meta)


@dataclass(frozen=True)
class ToneItem:
    """One planned clip (picklable: the shard writer may use processes)."""
    key: str
    frames: int
    size: int
    rgb: bool
    seed: int
    split: str


def make_tone_sample(item: ToneItem) -> Sample:
    return tone_sample(item.key, item.frames, size=item.size, rgb=item.rgb, seed=item.seed, split=item.split)


def build_tone_corpus(folder: str | os.PathLike, splits: dict[str, tuple[int, int]], *, min_frames: int = 8,
                      max_frames: int = 40, size: int = 96, rgb_every: int = 3, seed: int = 0,
                      workers: int = 1) -> dict[str, list[str]]:
    """splits: name -> (num_shards, samples_per_shard). Clip lengths vary in [min_frames, max_frames];
    every `rgb_every`-th clip is RGB and every 4th is 88x88. Returns split -> sample keys in shard order."""
    rng = np.random.default_rng(seed)
    keys = {}
    for split, (n_shards, n) in splits.items():     # the writer takes one sample bound: one call per split
        items = [ToneItem(key=f"{split}_s{idx // n:02d}_{idx % n:03d}",
                          frames=int(rng.integers(min_frames, max_frames + 1)),
                          size=88 if idx % 4 == 3 else size, rgb=rgb_every > 0 and idx % rgb_every == 0,
                          seed=seed * 7919 + idx, split=split)
                 for idx in range(n_shards * n)]
        write_splits([SplitSpec(split, items, meta={"tool": "data_tools.tones", "seed": seed})], make_tone_sample,
                     folder, max_bytes=None, max_samples=n, workers=workers, progress=False)
        keys[split] = [item.key for item in items]
    return keys
