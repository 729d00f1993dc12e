"""The shard format: what a shard set is, for the tools that write it and the pipeline that reads it.

A shard set is WebDataset tars `{split}-NNNNNN.tar`; each sample has the members below (audio as
`wav` or `flac`, 16 kHz mono; mouth video as `mp4`, 25 fps; the transcript `txt`; metadata `json`),
and each split has an index `{split}.index.json` listing its shards with their sample counts and
total audio duration, so a loader can plan epochs, check that every (rank, worker) gets a shard, and
report progress without opening the tars.

This module also holds the one way each medium is read back (the mp4 decoder and its grayscale
conversion, audio bytes to samples, resampling, trimming audio to the video), so that the validator
sees a sample exactly as the loader does. Writing media (ffmpeg, espeak-ng) is data_tools' business.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import storage

# ---------------------------------------------------------------- sample layout

SAMPLE_RATE = 16000                  # audio samples per second
FPS = 25.0                           # video frames per second
SAMPLES_PER_FRAME = int(SAMPLE_RATE / FPS)   # 640: one video frame's worth of audio
AUDIO_KEYS = ("wav", "flac")         # a sample's audio member: either, wav preferred
VIDEO_KEY, TEXT_KEY, META_KEY = "mp4", "txt", "json"

# ---------------------------------------------------------------- the index

INDEX_VERSION = 1


@dataclass
class ShardInfo:
    name: str            # file name relative to the index's folder, e.g. "train-000000.tar"
    samples: int
    duration: float      # seconds of audio in the shard


class ShardTotals:
    """Samples and seconds of a list of `shards` (anything with `.samples` and `.duration`): the
    index's, and the validator's report of a split."""
    shards: list

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.shards)


@dataclass
class ShardIndex(ShardTotals):
    split: str
    shards: list[ShardInfo]
    sample_rate: int = SAMPLE_RATE
    fps: float = FPS
    meta: dict = field(default_factory=dict)   # who wrote it, from what, with which options
    version: int = INDEX_VERSION
    root: Path | str | None = None             # folder (or remote prefix) of the index file; not serialised
    digest: str = ""                           # sha256 of the index file as read; not serialised

    @property
    def urls(self) -> list[str]:
        if storage.is_remote(self.root):
            return [storage.join(self.root, s.name) for s in self.shards]
        root = self.root or Path(".")
        return [str(root / s.name) for s in self.shards]

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d.pop("digest")
        d["num_samples"] = self.num_samples
        d["total_duration"] = round(self.duration, 3)
        return d

    def save(self, folder: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written index."""
        if storage.is_remote(folder):
            storage.OutFolder(folder).write_bytes(index_name(self.split), json.dumps(self.to_dict(), indent=2).encode())
            return storage.join(folder, index_name(self.split))
        path = index_path(folder, self.split)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path


def index_name(split: str) -> str:
    return f"{split}.index.json"


def index_path(folder: str | os.PathLike, split: str) -> Path:
    return Path(folder) / index_name(split)


def index_location(folder: str | os.PathLike, split: str) -> str:
    """Where the index of `split` is: a local path, or a URL under a remote prefix."""
    return storage.join(folder, index_name(split))


def available_splits(folder: str | os.PathLike) -> list[str] | None:
    """Splits with an index in `folder` (a folder or s3:// prefix); None where the store cannot list."""
    names = storage.list_names(str(folder))
    if names is None:
        return None
    return sorted(n[:-len(".index.json")] for n in names if n.endswith(".index.json"))


# a shard name is a plain file name next to the index: an index cannot point elsewhere (another
# folder, another host, or a pipe: command)
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def load_index(folder: str | os.PathLike, split: str,
               policy: storage.RetryPolicy = storage.RetryPolicy()) -> ShardIndex:
    """Read `{folder}/{split}.index.json` (a folder or remote prefix); clear errors for a missing,
    unreachable or malformed index."""
    if storage.is_remote(folder):
        path = index_location(folder, split)
        try:
            data = storage.read_bytes(path, policy)
        except FileNotFoundError:
            raise _missing_index(folder, split, path, available_splits_or_none(folder, policy)) from None
        except OSError as err:
            raise storage.RemoteError(f"cannot read the {split!r} shard index {storage.redact(path)}: "
                                      f"{storage.redact(str(err))}") from err
        root: Path | str = folder
    else:
        path = index_path(folder, split)
        if not path.is_file():
            available = sorted(p.name for p in Path(folder).glob("*.index.json")) if Path(folder).is_dir() else []
            raise _missing_index(folder, split, path, available)
        data = path.read_bytes()
        root = path.parent
    try:
        raw = json.loads(data)
        version = raw.get("version", INDEX_VERSION)
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), duration=float(s["duration"]))
                  for s in raw["shards"]]
    except (AttributeError, KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        what = "cut short or not JSON" if isinstance(err, json.JSONDecodeError) else \
            f"not a shard index of this format (no valid {err} entry)" if isinstance(err, KeyError) else \
            f"not a shard index of this format ({err})"
        raise ValueError(f"malformed shard index {storage.redact(str(path))}: {what}; write it again with "
                         f"`python -m data_tools synth` / `lrs3` (an index is a JSON object with a \"shards\" "
                         f"list of name/samples/duration)") from err
    bad = [s.name for s in shards if not SAFE_NAME.match(s.name)]
    if bad:
        raise ValueError(f"shard index {storage.redact(str(path))} names files outside its folder: {bad[:3]}")
    if version != INDEX_VERSION:
        raise ValueError(f"shard index {storage.redact(str(path))} has format version {version!r}; this code reads "
                         f"version {INDEX_VERSION} (rebuild the shards with this checkout's `python -m data_tools`)")
    return ShardIndex(split=raw.get("split", split), shards=shards, sample_rate=int(raw.get("sample_rate", SAMPLE_RATE)),
                      fps=float(raw.get("fps", FPS)), meta=raw.get("meta", {}), version=raw.get("version", 1),
                      root=root, digest=hashlib.sha256(data).hexdigest())


def check_split(shard_dir: str | os.PathLike, split: str) -> None:
    """A clear error unless `shard_dir` (a folder or remote location) holds an index for `split`."""
    if not shard_dir:
        raise FileNotFoundError("no shard location (a run folder's own is not used when it is a pipe: "
                                "command): pass --shards")
    storage.check_location(str(shard_dir))
    if storage.is_remote(shard_dir):
        if not storage.exists(index_location(shard_dir, split)):
            have = available_splits_or_none(str(shard_dir), storage.RetryPolicy())
            raise FileNotFoundError(f"no split {split!r} at {storage.redact(str(shard_dir))} (no "
                                    f"{index_name(split)}); splits there: "
                                    f"{'cannot list' if have is None else have or 'none'}")
        return
    shards = Path(shard_dir)
    if not shards.is_dir():
        raise FileNotFoundError(f"shard folder not found: {shards}")
    if not index_path(shards, split).is_file():
        have = sorted(p.name.removesuffix(".index.json") for p in shards.glob("*.index.json"))
        raise FileNotFoundError(f"no split {split!r} in {shards} (no {index_name(split)}); "
                                f"splits there: {have or 'none'}")


def available_splits_or_none(folder: str, policy: storage.RetryPolicy) -> list[str] | None:
    try:
        return available_splits(folder)
    except OSError:
        return None


def _missing_index(folder, split: str, path, available) -> FileNotFoundError:
    listing = "cannot list" if available is None else (available or "none")
    return FileNotFoundError(
        f"no shard index for split {split!r} at {storage.redact(str(path))} (indexes there: {listing}); "
        f"build shards with `python -m data_tools synth` or `python -m data_tools lrs3`")


# ---------------------------------------------------------------- reading the media back

class MediaDecodeError(ValueError):
    """A sample's audio or video does not decode; the message says why in one printable line."""


@dataclass
class AudioInfo:
    sample_rate: int
    channels: int
    num_samples: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def decode_audio(data: bytes) -> tuple[np.ndarray, AudioInfo]:
    """wav/flac bytes -> float32 [n] (mono) or [n, channels], and its info (soundfile: torchaudio.load
    needs torchcodec)."""
    import soundfile as sf

    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for bad data
        raise MediaDecodeError(f"audio does not decode: {err}") from None
    info = AudioInfo(sample_rate=int(sr), channels=audio.shape[1], num_samples=audio.shape[0])
    return (audio[:, 0] if info.channels == 1 else audio), info


def fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Trim or zero-pad to exactly num_samples, so audio and video frames line up (auto_avsr's
    cut_or_pad)."""
    if len(audio) >= num_samples:
        return audio[:num_samples]
    return np.pad(audio, (0, num_samples - len(audio)))


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE, zero_crossings: int = 16) -> np.ndarray:
    """Band-limited resampling of mono audio (Kaiser-windowed sinc, polyphase), in numpy.

    In-process on purpose: an ffmpeg call costs ~100 ms of start-up per utterance, and torchaudio's
    kernel grows with the reduced rate ratio (15999 -> 16000 Hz took 5 GB for 1 s of audio).
    """
    if sr_in == sr_out or len(audio) == 0:
        return audio.astype(np.float32)
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g                # output n sits at input position n * down / up
    fc = min(1.0, up / down) * 0.97                   # cutoff, as a fraction of the input Nyquist
    half = int(np.ceil(zero_crossings / fc))          # kernel half-width in input samples
    taps = np.arange(-half + 1, half + 1)
    # the fractional position repeats every `up` outputs: one kernel per phase
    frac = (np.arange(up) * down % up) / up
    t = frac[:, None] - taps[None, :]
    window = np.i0(8.6 * np.sqrt(np.clip(1 - (t / half) ** 2, 0, 1))) / np.i0(8.6)
    kernels = (fc * np.sinc(fc * t) * window).astype(np.float32)       # [up, 2 * half]
    x = np.pad(audio.astype(np.float32), (half, half + 1))
    n_out = int(np.ceil(len(audio) * up / down))
    out = np.empty(n_out, dtype=np.float32)
    for start in range(0, n_out, 8192):               # chunks bound the [chunk, taps] temporaries
        n = np.arange(start, min(start + 8192, n_out))
        idx = (n * down // up)[:, None] + taps[None, :] + half
        out[n] = np.einsum("ij,ij->i", x[idx], kernels[n % up])
    return out


# ITU-R BT.601 luma, with torchvision's rgb_to_grayscale rounding of its weights: auto_avsr's
# Grayscale transform, which the video encoders were trained behind (for a gray clip stored as
# yuv420p, R = G = B and this is the gray level itself).
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or float) [..., 3] RGB -> float32 [...] luma in 0..255."""
    return rgb.astype(np.float32) @ GRAY_WEIGHTS


def gray_uint8(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> uint8 [...] luma (what ffmpeg's `gray` pixel format holds)."""
    return np.clip(np.rint(to_gray(rgb)), 0, 255).astype(np.uint8)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: decord's C++ logger prints the whole input (binary bytes) on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _decord():
    import decord  # imported on first use: its FFmpeg libraries are heavy and the index readers need none

    decord.logging.set_level(decord.logging.QUIET)   # broken clips are reported, not printed (but decord's
    # "ERROR opening" line, with the whole input, ignores the level: opening runs under quiet_stderr)
    return decord


def _clean_error(err: Exception) -> str:
    msg = str(err)
    if "ERROR opening" in msg:          # "... ERROR opening: <the input bytes>, <FFmpeg's reason>"
        msg = "cannot open: " + msg.rsplit(", ", 1)[-1]
    lines = msg.strip().splitlines()
    msg = "".join(c if c.isprintable() else "?" for c in (lines[-1] if lines else ""))
    return msg[:300] or type(err).__name__


class Mp4:
    """An mp4 sample opened from its bytes with decord: frame count and fps at once (cheap, so a
    reader can refuse a clip before decoding it), the frames on request. One thread: the callers'
    worker processes are the parallelism."""

    def __init__(self, data: bytes):
        decord = _decord()
        try:
            with quiet_stderr():
                self._reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except Exception as err:                    # decord raises DECORDError / RuntimeError with FFmpeg text
            raise MediaDecodeError(f"video does not decode: {_clean_error(err)}") from None

    def rgb(self) -> np.ndarray:
        """Every frame, uint8 [T, H, W, 3]; the reader is released after."""
        if self.num_frames == 0:
            raise MediaDecodeError("video has no frames")
        try:
            return self._reader.get_batch(list(range(self.num_frames))).asnumpy()
        except Exception as err:
            raise MediaDecodeError(f"video does not decode: {_clean_error(err)}") from None
        finally:
            self._reader = None

    def frame_size(self) -> tuple[int, int]:
        """(height, width), from the first frame."""
        if self.num_frames == 0:
            raise MediaDecodeError("video has no frames")
        try:
            return tuple(self._reader[0].asnumpy().shape[:2])
        except Exception as err:
            raise MediaDecodeError(f"video does not decode: {_clean_error(err)}") from None


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def decode_video(data: bytes, read_frames: bool = True) -> tuple[np.ndarray | None, VideoInfo]:
    """mp4 bytes -> (uint8 gray frames [T, H, W] or None, info), for the tools: the loader's decoder
    and grayscale, with every decord message silenced."""
    with quiet_stderr():
        mp4 = Mp4(data)
        height, width = mp4.frame_size()
        info = VideoInfo(num_frames=mp4.num_frames, fps=mp4.fps, height=height, width=width)
        frames = gray_uint8(mp4.rgb()) if read_frames else None
    return frames, info
