"""Decode one WebDataset sample into model-ready tensors, or skip it with a counted reason.

Video: decord reads the in-memory mp4, frames are cropped (center in eval, random in
training) to `crop_size`, converted to grayscale (shard_format.to_gray), optionally
flipped, and normalised as auto_avsr does: x / 255, then (x - 0.421) / 0.165.
Audio: soundfile reads wav/flac bytes, mixed down to mono, resampled to 16 kHz (or skipped
when strict), then trimmed or zero-padded to 640 samples per video frame so that the
4 mel frames per video frame line up; optional white or babble noise at an SNR; Whisper
log-mel features.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, islice

import numpy as np
import torch

from . import skips as R
from .config import DataConfig, Streams
from .features import log_mel
from .shard_format import (AUDIO_KEYS, FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, TEXT_KEY, VIDEO_KEY, MediaDecodeError,
                           Mp4, decode_audio, fit_length, resample, to_gray)
from .skips import SkipCounter

VIDEO_MEAN, VIDEO_STD = 0.421, 0.165          # auto_avsr's LRS3 statistics
FPS_TOLERANCE = 0.5


class Skip(Exception):
    """Raised inside decoding to drop the sample; carries the reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Clip:
    """One decoded, augmented utterance."""
    key: str
    text: str
    frames: int                       # video frames (25 fps); audio has 4 * frames mel frames
    video: torch.Tensor | None        # float32 [frames, crop, crop], normalised
    audio: torch.Tensor | None        # float32 [n_mels, 4 * frames] log-mel
    audio_pad: float = 0.0            # the clip's silence level, used to pad its log-mel
    wave: np.ndarray | None = None    # clean 16 kHz audio; feeds the babble reservoir, then dropped


def read_text(sample: dict) -> str:
    raw = sample.get(TEXT_KEY)
    if raw is None:
        raise Skip(R.EMPTY_TEXT, "no txt member")
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(text.split())
    if not text:
        raise Skip(R.EMPTY_TEXT, "blank transcript")
    return text


def read_video(data: bytes, cfg: DataConfig) -> np.ndarray:
    """mp4 bytes -> uint8 [T, H, W, 3]; checks length, fps and size before decoding frames."""
    try:
        video = Mp4(data)
    except MediaDecodeError as err:
        raise Skip(R.VIDEO_DECODE, str(err)) from None
    n, fps = video.num_frames, video.fps
    if n == 0:
        raise Skip(R.VIDEO_EMPTY, "0 frames")
    if n > cfg.max_clip_frames:
        raise Skip(R.TOO_LONG, f"{n} frames > {cfg.max_clip_frames}")   # before the costly decode
    if abs(fps - FPS) > FPS_TOLERANCE:
        raise Skip(R.VIDEO_FPS, f"{fps:.2f} fps, expected {FPS}")
    try:
        frames = video.rgb()
    except MediaDecodeError as err:
        raise Skip(R.VIDEO_DECODE, str(err)) from None
    if frames.shape[1] < cfg.crop_size or frames.shape[2] < cfg.crop_size:
        raise Skip(R.VIDEO_SIZE, f"{frames.shape[1]}x{frames.shape[2]} < crop {cfg.crop_size}")
    return frames


def read_audio(sample: dict, cfg: DataConfig, counter: SkipCounter) -> np.ndarray:
    """wav/flac bytes -> float32 mono [N] at 16 kHz."""
    data = next((sample[k] for k in AUDIO_KEYS if k in sample), None)
    if data is None:
        raise Skip(R.MISSING_AUDIO, f"none of {AUDIO_KEYS}")
    try:
        wav, info = decode_audio(data)
    except MediaDecodeError as err:
        raise Skip(R.AUDIO_DECODE, str(err)) from None
    if info.num_samples == 0:
        raise Skip(R.AUDIO_EMPTY, "0 samples")
    wav = wav.mean(axis=1) if info.channels > 1 else wav
    sr = info.sample_rate
    if sr != SAMPLE_RATE:
        if cfg.strict_sample_rate:
            raise Skip(R.AUDIO_SAMPLE_RATE, f"{sr} Hz")
        counter.note(R.RESAMPLED)
        wav = resample(np.ascontiguousarray(wav), sr, SAMPLE_RATE)
    if not np.isfinite(wav).all():
        raise Skip(R.AUDIO_DECODE, "non-finite samples")
    return np.ascontiguousarray(wav, dtype=np.float32)


def crop_gray_normalise(frames: np.ndarray, cfg: DataConfig, train: bool,
                        rng: np.random.Generator) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, crop, crop] normalised grayscale."""
    _, h, w, _ = frames.shape
    c = cfg.crop_size
    if train:
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    else:   # torchvision CenterCrop's rounding
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
    gray = to_gray(frames[:, top:top + c, left:left + c, :]) / 255.0
    if train and cfg.horizontal_flip and rng.random() < 0.5:
        gray = gray[:, :, ::-1]
    return torch.from_numpy((np.ascontiguousarray(gray) - VIDEO_MEAN) / VIDEO_STD)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    p_clean = float(np.mean(clean.astype(np.float64) ** 2))
    p_noise = float(np.mean(noise.astype(np.float64) ** 2))
    if p_clean == 0.0 or p_noise == 0.0:
        return clean                                  # silence: no SNR to speak of
    scale = np.sqrt(p_clean / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (clean + scale * noise).astype(np.float32)


class NoiseMixer:
    """White or babble noise; babble sums `babble_speakers` earlier clips from a reservoir."""

    def __init__(self, cfg: DataConfig, rng: np.random.Generator):
        self.cfg, self.rng = cfg, rng
        self.reservoir: list[np.ndarray] = []
        self.seen = 0

    def remember(self, wav: np.ndarray) -> None:
        """Reservoir sampling: a uniform sample of all clips seen so far, bounded in memory."""
        if self.cfg.noise != "babble":
            return
        self.seen += 1
        if len(self.reservoir) < self.cfg.babble_reservoir:
            self.reservoir.append(wav)
        else:
            j = int(self.rng.integers(0, self.seen))
            if j < self.cfg.babble_reservoir:
                self.reservoir[j] = wav

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        if cfg.noise == "none" or self.rng.random() >= cfg.noise_prob:
            return wav
        if cfg.noise == "white":
            noise = self.rng.standard_normal(len(wav)).astype(np.float32)
        else:
            if not self.reservoir:
                return wav                            # first clip of the stream: nothing to babble yet
            k = min(cfg.babble_speakers, len(self.reservoir))
            noise = np.zeros(len(wav), dtype=np.float32)
            for i in self.rng.choice(len(self.reservoir), size=k, replace=False):
                other = self.reservoir[int(i)]
                start = int(self.rng.integers(0, len(other)))
                noise += np.resize(np.roll(other, -start), len(wav))   # tile short clips
        return mix_at_snr(wav, noise, cfg.snr_db)


def decode_clip(sample: dict, cfg: DataConfig, streams: Streams, counter: SkipCounter, *, train: bool,
                rng: np.random.Generator, noise: NoiseMixer | None) -> Clip:
    """Decodes the streams the model reads; raises Skip for bad input (the caller counts it)."""
    key = str(sample.get("__key__", "?"))
    if streams.video and VIDEO_KEY not in sample:
        raise Skip(R.MISSING_VIDEO, "no mp4 member")
    if streams.audio and not any(k in sample for k in AUDIO_KEYS):
        raise Skip(R.MISSING_AUDIO, f"none of {AUDIO_KEYS}")
    text = read_text(sample)
    frames = read_video(sample[VIDEO_KEY], cfg) if streams.video else None
    wav = read_audio(sample, cfg, counter) if streams.audio else None
    n = len(frames) if frames is not None else int(round(len(wav) / SAMPLES_PER_FRAME))
    if n > cfg.max_clip_frames:
        raise Skip(R.TOO_LONG, f"{n} frames > {cfg.max_clip_frames}")
    if n < cfg.min_clip_frames:
        raise Skip(R.TOO_SHORT, f"{n} frames < {cfg.min_clip_frames}")
    video = crop_gray_normalise(frames, cfg, train, rng) if frames is not None else None
    audio, pad, clean = None, 0.0, None
    if wav is not None:
        clean = fit_length(wav, n * SAMPLES_PER_FRAME)
        noisy = noise(clean) if noise is not None else clean
        audio, pad = log_mel(torch.from_numpy(noisy), streams.n_mels)
    return Clip(key=key, text=text, frames=n, video=video, audio=audio, audio_pad=pad, wave=clean)


def decode_stream(samples, cfg: DataConfig, streams: Streams, counter: SkipCounter, *, train: bool,
                  rng: np.random.Generator, noise_rng: np.random.Generator):
    """Generator stage: raw samples in, Clips out; every bad sample is counted and dropped.
    Noise draws from its own generator, so switching noise on leaves crops and order unchanged."""
    use_noise = streams.audio and cfg.noise != "none" and (train or cfg.noise_in_eval)
    noise = NoiseMixer(cfg, noise_rng) if use_noise else None
    if noise is not None and not train and cfg.noise == "babble":
        samples = _prime_babble(samples, cfg, noise)
    for sample in samples:
        try:
            clip = decode_clip(sample, cfg, streams, counter, train=train, rng=rng, noise=noise)
        except Skip as s:
            counter.skip(s.reason, f"{sample.get('__key__')}: {s.detail}")
            continue
        except Exception as err:                      # anything unforeseen: count, keep going
            counter.skip(R.OTHER, f"{sample.get('__key__')}: {err!r}")
            continue
        counter.ok()
        if noise is not None and train and clip.wave is not None:
            noise.remember(clip.wave)
        clip.wave = None
        yield clip


def _prime_babble(samples, cfg: DataConfig, noise: NoiseMixer):
    """Evaluation under babble: the reservoir is the clean audio of the stream's first
    `babble_reservoir` clips, read before any clip is mixed, so that every clip gets babble (in
    training the reservoir fills as the stream goes and the first clip stays clean)."""
    samples = iter(samples)
    head = list(islice(samples, cfg.babble_reservoir))
    for sample in head:
        try:
            noise.remember(read_audio(sample, cfg, SkipCounter()))   # bad samples are counted when decoded
        except Exception:
            pass
    return chain(head, samples)
