"""Whisper log-mel features at the clip's natural length.

Numerically the same as transformers' WhisperFeatureExtractor (n_fft 400, hop 160, Hann
window, Slaney mel filters 0-8 kHz, log10, floor at max - 8, (x + 4) / 4) on the first
`len(wav) // 160` frames, without padding every clip to 30 s: the model pads when its encoder
needs a fixed length. Whisper pads the waveform with zeros, so the right edge here is padded
with zeros too (not reflected as torch.stft(center=True) would), which keeps the last frames
identical to Whisper's; the left edge is reflected, as in Whisper.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from transformers.audio_utils import mel_filter_bank    # the filters WhisperFeatureExtractor itself uses

from .shard_format import SAMPLE_RATE, SAMPLES_PER_FRAME

N_FFT = 400
MEL_HOP = 160
MELS_PER_FRAME = SAMPLES_PER_FRAME // MEL_HOP   # 4 Whisper mel frames per video frame


@lru_cache(maxsize=4)
def _mel_filters(n_mels: int) -> torch.Tensor:
    fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                         max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(fb).float().T.contiguous()          # [n_mels, n_freqs]


@lru_cache(maxsize=1)
def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT)


def log_mel(wav: torch.Tensor, n_mels: int) -> tuple[torch.Tensor, float]:
    """wav: float32 [N] at 16 kHz -> (log-mel [n_mels, N // 160], silence level).

    The silence level is what an all-zero frame maps to for this clip ((max(max - 8, -10) + 4) / 4):
    pad with it, and padded frames look exactly like Whisper's 30 s zero padding.
    """
    if wav.dim() != 1:
        raise ValueError(f"log_mel expects a 1-D waveform, got shape {tuple(wav.shape)}")
    n = wav.shape[0]
    frames = n // MEL_HOP
    if frames == 0:
        raise ValueError(f"waveform of {n} samples is shorter than one mel hop ({MEL_HOP})")
    half = N_FFT // 2
    x = wav.float()
    left = torch.flip(x[1:half + 1], dims=[0]) if n > half else torch.zeros(half)
    left = torch.nn.functional.pad(left, (half - left.shape[0], 0))
    x = torch.cat([left, x, torch.zeros(half)])
    spec = torch.stft(x, N_FFT, MEL_HOP, window=_window(), center=False, return_complex=True)
    power = spec[:, :frames].abs() ** 2                   # Whisper drops the last STFT frame
    mel = _mel_filters(n_mels) @ power
    logspec = torch.clamp(mel, min=1e-10).log10()
    top = float(logspec.max())
    logspec = (torch.maximum(logspec, torch.tensor(top - 8.0)) + 4.0) / 4.0
    return logspec, (max(top - 8.0, -10.0) + 4.0) / 4.0
