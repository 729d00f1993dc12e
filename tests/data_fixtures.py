"""Small, real WebDataset shards for tests and benchmarks.

Video is encoded to mp4 by the ffmpeg binary (H.264, 25 fps), audio written as 16 kHz WAV by
soundfile, packed with webdataset.TarWriter and indexed with trainer.data.shard_format.ShardIndex,
so tests exercise the same decoders as real data. Each clip has a "mouth" whose opening
follows the loudness of its tone, so the two modalities agree.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import webdataset as wds

from trainer.data.shard_format import ShardIndex, ShardInfo, shard_name

SR, FPS, SPF = 16000, 25, 640
WORDS = ("place blue at f two now lay green by a one soon set red in b three please "
         "bin white with c four again").split()


def have_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None


def encode_mp4(frames: np.ndarray, fps: int = FPS) -> bytes:
    """uint8 [T, H, W] (gray) or [T, H, W, 3] (RGB) -> H.264 mp4 bytes (moov atom at the end)."""
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise ValueError(f"need uint8 [T,H,W] or [T,H,W,3], got {frames.dtype} {frames.shape}")
    t, h, w = frames.shape[:3]
    pix = "gray" if frames.ndim == 3 else "rgb24"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "clip.mp4")
        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", pix,
               "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "ultrafast",
               "-crf", "15", "-pix_fmt", "yuv420p", "-threads", "1", out]
        subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), check=True, capture_output=True)
        return Path(out).read_bytes()


def encode_wav(wav: np.ndarray, sr: int = SR) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_clip(frames: int, *, size: int = 96, rgb: bool = False, seed: int = 0, sr: int = SR,
              freq: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(video uint8 [T, size, size(, 3)], audio float32 [frames * sr / 25]) that go together."""
    rng = np.random.default_rng(seed)
    n = frames * sr // FPS
    t = np.arange(n) / sr
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (1.0 + seed % 3) * t)
    freq = freq or 200.0 + 40.0 * (seed % 7)
    audio = (0.3 * envelope * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(n)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    video = np.empty((frames, size, size), np.uint8)
    for i in range(frames):
        opening = envelope[min(n - 1, i * sr // FPS)]
        mouth = ((xx - size / 2) / (size / 4)) ** 2 + ((yy - size / 2) / (2 + size / 6 * opening)) ** 2 < 1
        img = 110 + 20 * np.sin(xx / 7.0 + i / 3.0) + rng.normal(0, 4, (size, size))
        img[mouth] = 30
        video[i] = np.clip(img, 0, 255).astype(np.uint8)
    if rgb:
        video = np.stack([video, (video * 0.9).astype(np.uint8), (video * 0.8).astype(np.uint8)], axis=-1)
    return video, audio


def make_sample(key: str, frames: int, *, size: int = 96, rgb: bool = False, seed: int = 0,
                text: str | None = None, split: str = "train") -> dict:
    video, audio = make_clip(frames, size=size, rgb=rgb, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    text = text if text is not None else " ".join(rng.choice(WORDS, size=4))
    meta = {"speaker": f"spk{seed % 3}", "duration": len(audio) / SR, "num_frames": frames,
            "source": "tests/data_fixtures.py", "dataset": "fixture", "split": split}
    return {"__key__": key, "wav": encode_wav(audio), "mp4": encode_mp4(video), "txt": text.encode(),
            "json": json.dumps(meta).encode()}


def sample_duration(sample: dict) -> float:
    """Seconds of audio in a sample (0 when it has none or it does not decode)."""
    for k in ("wav", "flac"):
        if k in sample:
            try:
                info = sf.info(io.BytesIO(sample[k]))
                return info.frames / info.samplerate
            except Exception:
                return 0.0
    return 0.0


def write_shards(folder: str | os.PathLike, split: str, shards: list[list[dict]]) -> ShardIndex:
    """Write one tar per list of samples, plus `{split}.index.json`; returns the index."""
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
    index = ShardIndex(split=split, shards=infos, meta={"writer": "tests/data_fixtures.py"}, root=folder)
    index.save(folder)
    return index


@dataclass
class Corpus:
    folder: Path
    keys: dict[str, list[str]]      # split -> sample keys, in shard order


def make_corpus(folder: str | os.PathLike, splits: dict[str, tuple[int, int]], *, min_frames: int = 8,
                max_frames: int = 40, size: int = 96, rgb_every: int = 3, seed: int = 0) -> Corpus:
    """splits: name -> (num_shards, samples_per_shard). Clip lengths vary in [min_frames, max_frames];
    every `rgb_every`-th clip is RGB and some are 88x88, as in real shard sets."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    keys: dict[str, list[str]] = {}
    for split, (n_shards, per_shard) in splits.items():
        shards, keys[split] = [], []
        for s in range(n_shards):
            samples = []
            for j in range(per_shard):
                k = f"{split}_s{s:02d}_{j:03d}"
                idx = s * per_shard + j
                side = 88 if idx % 4 == 3 else size
                samples.append(make_sample(k, int(rng.integers(min_frames, max_frames + 1)), size=side,
                                           rgb=rgb_every > 0 and idx % rgb_every == 0,
                                           seed=seed * 7919 + idx, split=split))
                keys[split].append(k)
            shards.append(samples)
        write_shards(folder, split, shards)
    return Corpus(folder=folder, keys=keys)
