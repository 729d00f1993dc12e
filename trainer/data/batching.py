"""Batches under a padded video-frame budget, and their collation.

A batch of B clips whose longest clip has T video frames costs B * T (the padded size the
encoders see); batches are filled greedily while B * T <= max_frames_per_batch and
B <= max_batch_size. Training first gathers `sort_buffer` clips and sorts them by length so
that similar lengths share a batch (less padding), then emits that buffer's batches in random
order; evaluation keeps the stream order.

Batch schema (a dict; keys of a disabled modality are omitted):
    "keys":          list[str]            sample keys (`__key__` in the shards)
    "text":          list[str]            transcripts, whitespace-normalised
    "video":         FloatTensor [B, Tv, crop, crop]   normalised grayscale, zero-padded   (vsr, avsr)
    "video_lengths": LongTensor  [B]      video frames per clip                            (vsr, avsr)
    "audio":         FloatTensor [B, n_mels, Tm]       Whisper log-mel, Tm = 4 * Tv        (asr, avsr)
    "audio_lengths": LongTensor  [B]      mel frames per clip (= 4 * video frames)         (asr, avsr)
    "audio_pad":     FloatTensor [B]      each clip's silence level, the value its mel frames
                                          are padded with (pad further with it, e.g. to
                                          Whisper's 3000 frames, and it matches Whisper)    (asr, avsr)
    "frames":        LongTensor  [B]      video frames per clip (in ASR too, from the audio length)
    "skipped":       dict[str, int]       skip/note counts by reason since this worker's
                                          previous batch (see skips.py); sum them in the trainer
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .decode import Clip
from .features import MELS_PER_FRAME
from .skips import SkipCounter


def fits(n: int, longest: int, max_frames: int, max_batch: int) -> bool:
    """Can a batch hold n clips whose longest has `longest` frames?"""
    return n <= max_batch and n * longest <= max_frames


def greedy(clips: Iterable[Clip], max_frames: int, max_batch: int) -> Iterator[list[Clip]]:
    """Greedy packing in the given order: close the batch when the next clip would not fit."""
    cur: list[Clip] = []
    longest = 0
    for clip in clips:
        new_longest = max(longest, clip.frames)
        if cur and not fits(len(cur) + 1, new_longest, max_frames, max_batch):
            yield cur
            cur, new_longest = [], clip.frames
        cur.append(clip)
        longest = new_longest
    if cur:
        yield cur


def budget_batches(clips: Iterable[Clip], max_frames: int, max_batch: int, sort_buffer: int = 0,
                   rng: np.random.Generator | None = None) -> Iterator[list[Clip]]:
    """Group a clip stream into batches under the frame budget.

    sort_buffer <= 1: stream order. Otherwise sort each buffer by length, pack, and shuffle the
    buffer's batches with `rng`. Nothing is carried between buffers: a carried remainder would
    always hold the longest clips and could starve them.
    """
    if sort_buffer <= 1:
        yield from greedy(clips, max_frames, max_batch)
        return
    buf: list[Clip] = []
    for clip in clips:
        buf.append(clip)
        if len(buf) >= sort_buffer:
            yield from _sorted_batches(buf, max_frames, max_batch, rng)
            buf = []
    if buf:
        yield from _sorted_batches(buf, max_frames, max_batch, rng)


def _sorted_batches(buf: list[Clip], max_frames: int, max_batch: int,
                    rng: np.random.Generator | None) -> list[list[Clip]]:
    batches = list(greedy(sorted(buf, key=lambda c: c.frames), max_frames, max_batch))
    if rng is not None and len(batches) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(clips: list[Clip], skipped: dict[str, int]) -> dict:
    b = len(clips)
    frames = torch.tensor([c.frames for c in clips], dtype=torch.long)
    t = int(frames.max())
    out: dict = {"keys": [c.key for c in clips], "text": [c.text for c in clips], "frames": frames,
                 "skipped": skipped}
    if clips[0].video is not None:
        side = clips[0].video.shape[-1]
        video = torch.zeros(b, t, side, side, dtype=torch.float32)
        for i, c in enumerate(clips):
            video[i, :c.frames] = c.video
        out["video"], out["video_lengths"] = video, frames.clone()
    if clips[0].audio is not None:
        n_mels = clips[0].audio.shape[0]
        pads = torch.tensor([c.audio_pad for c in clips], dtype=torch.float32)
        audio = pads.view(b, 1, 1).expand(b, n_mels, t * MELS_PER_FRAME).clone()
        for i, c in enumerate(clips):
            audio[i, :, :c.audio.shape[1]] = c.audio
        out["audio"], out["audio_lengths"], out["audio_pad"] = audio, frames * MELS_PER_FRAME, pads
    return out


def collate_stream(batches: Iterable[list[Clip]], counter: SkipCounter) -> Iterator[dict]:
    """Collate, attaching the skip counts. Holds one batch back so that skips found after the
    last batch still travel with it (a worker whose every sample failed has no batch to carry them)."""
    pending = None
    for batch in batches:
        if pending is not None:
            yield collate(pending, counter.drain())
        pending = batch
    if pending is not None:
        yield collate(pending, counter.drain())
