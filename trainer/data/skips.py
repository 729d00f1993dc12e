"""Counting bad input instead of dying on it.

Each DataLoader worker owns a `SkipCounter`; the batcher drains it into every batch
(`batch["skipped"]`), so the trainer can sum the counts in the main process with its own
`SkipCounter.update(...)` and report them (and all-reduce them across ranks if it likes).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# Reasons a sample is dropped. Keep the names stable: dashboards and tests use them.
TAR_ERROR = "tar_error"                  # an error reading a shard (counts errors, not samples)
SHARD_SHORT = "shard_short"              # samples the index promises but the tar did not deliver
MISSING_AUDIO = "missing_audio"
MISSING_VIDEO = "missing_video"
EMPTY_TEXT = "empty_text"                # missing or blank transcript
AUDIO_DECODE = "audio_decode"
AUDIO_EMPTY = "audio_empty"
AUDIO_SAMPLE_RATE = "audio_sample_rate"  # not 16 kHz and strict_sample_rate
VIDEO_DECODE = "video_decode"
VIDEO_EMPTY = "video_empty"
VIDEO_FPS = "video_fps"                  # not 25 fps: audio/video alignment would be wrong
VIDEO_SIZE = "video_size"                # smaller than the crop
TOO_LONG = "too_long"
TOO_SHORT = "too_short"
OTHER = "other"
SKIP_REASONS = (TAR_ERROR, SHARD_SHORT, MISSING_AUDIO, MISSING_VIDEO, EMPTY_TEXT, AUDIO_DECODE, AUDIO_EMPTY,
                AUDIO_SAMPLE_RATE, VIDEO_DECODE, VIDEO_EMPTY, VIDEO_FPS, VIDEO_SIZE, TOO_LONG,
                TOO_SHORT, OTHER)

# Whole-shard failures: counted, but not evidence that the shard set is unusable (one corrupt shard
# of thousands of samples must not stop a run); the pipeline raises when a whole pass over the
# shards delivers nothing instead. TAR_ERROR counts errors, not samples, so `total` leaves it out.
SHARD_REASONS = (TAR_ERROR, SHARD_SHORT)

# Events that keep the sample but are worth knowing about.
RESAMPLED = "resampled_audio"
NOTE_REASONS = (RESAMPLED,)
# Remote reads retried after a transient error, by kind: counted under RETRIED + kind, reported as
# data/retried/<kind>. A fixed set, so ranks can all-reduce them like the skip reasons.
RETRIED = "retried/"
RETRY_KINDS = ("connection", "timeout", "http_429", "http_500", "http_502", "http_503", "http_504", "http_other",
               "pipe_exit", "other")
RETRY_REASONS = tuple(RETRIED + kind for kind in RETRY_KINDS)


def is_note(reason: str) -> bool:
    return reason in NOTE_REASONS or reason.startswith(RETRIED)


def metric_name(reason: str) -> str:
    """The metric a count is logged under: data/retried/<reason> or data/skipped/<reason>."""
    return f"data/{reason}" if reason.startswith(RETRIED) else f"data/skipped/{reason}"


class UnusableDataError(RuntimeError):
    """The shard set yields nothing usable: wrong folder, wrong format, or every sample broken."""


@dataclass
class SkipCounter:
    """Counts per reason; `total` counts only real skips (not notes such as resampling).

    `max_initial_failures`: raise UnusableDataError once this many samples failed to decode before
    the first good one (shard-level failures do not count; 0 disables the check; the main-process
    aggregate uses 0).
    """
    max_initial_failures: int = 0
    counts: Counter = field(default_factory=Counter)
    good: int = 0
    _pending: Counter = field(default_factory=Counter)   # not yet handed out by drain()

    def skip(self, reason: str, detail: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        self._pending[reason] += n
        if (self.max_initial_failures and self.good == 0 and not is_note(reason) and reason not in SHARD_REASONS
                and self.sample_failures >= self.max_initial_failures):
            raise UnusableDataError(
                f"{self.sample_failures} samples failed before any decoded (by reason: "
                f"{dict(self.skipped_only())}); "
                f"last: {reason} {detail[:300]}. Check the shard folder, the shard format and the "
                f"modality settings")

    def note(self, reason: str) -> None:
        self.counts[reason] += 1
        self._pending[reason] += 1

    def retried(self, reason: str) -> None:
        """A remote read retried after a transient error (on_retry callback of trainer.data.storage)."""
        kind = reason if reason in RETRY_KINDS else "http_other" if reason.startswith("http_") else "other"
        self.note(RETRIED + kind)

    def ok(self) -> None:
        self.good += 1

    def drain(self) -> dict[str, int]:
        """Counts since the previous drain (what goes into a batch)."""
        out = dict(self._pending)
        self._pending.clear()
        return out

    def update(self, counts: dict[str, int]) -> None:
        """Aggregate counts drained elsewhere (e.g. from `batch["skipped"]` in the main process)."""
        for reason, n in counts.items():
            self.counts[reason] += int(n)

    def skipped_only(self) -> dict[str, int]:
        return {r: n for r, n in self.counts.items() if not is_note(r) and n}

    @property
    def total(self) -> int:
        """Samples skipped (shard read errors are counted apart: they are errors, not samples)."""
        return sum(n for r, n in self.skipped_only().items() if r != TAR_ERROR)

    @property
    def sample_failures(self) -> int:
        """Samples that were read but failed to decode or were filtered."""
        return sum(n for r, n in self.skipped_only().items() if r not in SHARD_REASONS)

    def report(self) -> str:
        if not self.counts:
            return "no samples skipped"
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        return f"{self.total} samples skipped ({parts})"


def skip_summary(counts: dict[str, int]) -> str:
    """One line: "3 samples skipped (audio_decode 2, too_long 1)", shard read errors and notes apart;
    "" when nothing was skipped."""
    skipped = {r: n for r, n in counts.items() if n and not is_note(r) and r != TAR_ERROR}
    parts = [f"{sum(skipped.values())} samples skipped ("
             + ", ".join(f"{r} {n}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1])) + ")"] \
        if skipped else []
    if counts.get(TAR_ERROR):
        parts.append(f"{counts[TAR_ERROR]} shard read errors")
    return "; ".join(parts)


def skip_report(counts: dict[str, int]) -> dict:
    """The end-of-run account of bad data (results.json "data_skipped" and the final log line): samples
    skipped by reason, shard read errors apart, retries and resampling as notes, and one summary line."""
    counts = {r: int(n) for r, n in counts.items() if n}
    skipped = {r: n for r, n in counts.items() if not is_note(r) and r != TAR_ERROR}
    return {"samples": sum(skipped.values()), "by_reason": skipped, "shard_read_errors": counts.get(TAR_ERROR, 0),
            "notes": {r: n for r, n in counts.items() if is_note(r)},
            "summary": skip_summary(counts) or "nothing skipped"}
