"""Frame-budget batching and collation, on synthetic clips (no decoding needed)."""
import numpy as np
import pytest
import torch

from trainer.data.batching import budget_batches, collate, collate_stream
from trainer.data.decode import Clip
from trainer.data.skips import SkipCounter


def _clips(lengths, n_mels=4):
    return [Clip(key=f"c{i}", text=f"t{i}", frames=int(t), video=torch.full((int(t), 3, 3), float(i)),
                 audio=torch.full((n_mels, 4 * int(t)), float(i)), audio_pad=-1.0 - i)
            for i, t in enumerate(lengths)]


@pytest.mark.parametrize("sort_buffer", [0, 16, 1000])
def test_batches_respect_the_padded_frame_budget(sort_buffer):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=300)
    clips = _clips(lengths)
    batches = list(budget_batches(iter(clips), max_frames=400, max_batch=7, sort_buffer=sort_buffer,
                                  rng=np.random.default_rng(1)))
    for b in batches:
        assert len(b) <= 7 and len(b) * max(c.frames for c in b) <= 400
    keys = [c.key for b in batches for c in b]
    assert sorted(keys) == sorted(c.key for c in clips)        # every clip exactly once
    if sort_buffer == 0:
        assert keys == [c.key for c in clips]                  # eval keeps the stream order


def test_sorting_reduces_padding():
    lengths = np.random.default_rng(2).integers(5, 200, size=400)

    def padded(sort_buffer):
        bs = budget_batches(iter(_clips(lengths)), 800, 64, sort_buffer, np.random.default_rng(0))
        return sum(len(b) * max(c.frames for c in b) for b in bs)

    assert padded(64) < 0.85 * padded(0)


def test_collate_pads_and_reports_lengths():
    clips = _clips([3, 5, 2])
    b = collate(clips, {"too_long": 2})
    assert b["keys"] == ["c0", "c1", "c2"] and b["text"] == ["t0", "t1", "t2"]
    assert b["video"].shape == (3, 5, 3, 3) and b["video_lengths"].tolist() == [3, 5, 2]
    assert b["audio"].shape == (3, 4, 20) and b["audio_lengths"].tolist() == [12, 20, 8]
    assert torch.all(b["video"][0, 3:] == 0) and torch.all(b["video"][0, :3] == 0.0)
    assert torch.all(b["video"][2, :2] == 2.0) and torch.all(b["video"][2, 2:] == 0)
    assert torch.all(b["audio"][2, :, :8] == 2.0)
    assert torch.all(b["audio"][2, :, 8:] == -3.0)            # padded with its own silence level
    assert b["audio_pad"].tolist() == [-1.0, -2.0, -3.0] and b["skipped"] == {"too_long": 2}
    assert b["video"].dtype == torch.float32 and b["audio_lengths"].dtype == torch.long


def test_collate_stream_carries_trailing_skips_in_the_last_batch():
    counter = SkipCounter()
    clips = _clips([4, 4, 4])

    def batches():
        counter.skip("video_decode")
        yield clips[:2]
        counter.skip("too_long")
        yield clips[2:]
        counter.skip("empty_text")          # after the last batch was formed

    out = list(collate_stream(batches(), counter))
    total = SkipCounter()
    for b in out:
        total.update(b["skipped"])
    assert total.counts == {"video_decode": 1, "too_long": 1, "empty_text": 1}
    assert out[-1]["skipped"].get("empty_text") == 1


def test_skip_counter_raises_when_nothing_ever_decodes():
    from trainer.data.skips import UnusableDataError
    c = SkipCounter(max_initial_failures=3)
    c.skip("video_decode")
    c.note("resampled_audio")                # notes do not count towards the limit
    c.skip("video_decode")
    with pytest.raises(UnusableDataError, match="3 samples failed before any decoded"):
        c.skip("audio_empty")
    ok = SkipCounter(max_initial_failures=2)
    ok.ok()
    for _ in range(5):
        ok.skip("too_long")                  # after a success, skips are just counted
    assert ok.total == 5 and "too_long=5" in ok.report()
