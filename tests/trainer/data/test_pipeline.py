"""The streaming pipeline end to end on real fixture shards (ffmpeg-encoded mp4, WAV, real tars).

Eval covers every sample exactly once across ranks x workers; training is deterministic per
(seed, epoch) and equal in length on every rank; bad input is skipped and counted by reason.
"""
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_tools.media import encode_mp4
from tests.constants import REPO
from tests.helpers import command, run
from tests.support.data_fixtures import have_ffmpeg, make_clip, make_corpus, make_sample, write_shards
from trainer.data import DataConfig, SkipCounter, UnusableDataError, build_eval_loader, build_train_loader
from trainer.data.shard_format import load_index
from trainer.model.config import ModelConfig

STREAMS = ModelConfig().streams()          # what the default (tiny, avsr) model reads

pytestmark = pytest.mark.skipif(not have_ffmpeg(), reason="ffmpeg binary needed to encode fixture mp4")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """train: 3 shards x 5 clips; val: 4 shards x 3 clips; clips of 8-40 frames, gray/RGB, 88/96 px."""
    return make_corpus(tmp_path_factory.mktemp("shards"), {"train": (3, 5), "val": (4, 3)})


def _cfg(folder, **kw):
    base = dict(shard_dir=str(folder), num_workers=0, max_frames_per_batch=120, max_clip_frames=100,
                shuffle_buffer=8, sort_buffer=8, prefetch_factor=2)
    base.update(kw)
    return DataConfig(**base)


def _keys(loader, counter=None):
    out = []
    for b in loader:
        out.extend(b["keys"])
        if counter is not None:
            counter.update(b["skipped"])
    return out


def test_eval_batches_have_the_documented_schema(corpus):
    batches = list(build_eval_loader(_cfg(corpus.folder), STREAMS, "val", 0, 1))
    for b in batches:
        n = len(b["keys"])
        assert len(b["text"]) == n and all(b["text"])
        assert b["video"].shape[0] == n and b["video"].shape[2:] == (88, 88)
        assert b["video"].shape[1] == int(b["video_lengths"].max())
        assert b["audio"].shape[:2] == (n, 80) and b["audio"].shape[2] == 4 * b["video"].shape[1]
        assert b["audio_lengths"].tolist() == [4 * v for v in b["video_lengths"].tolist()]
        assert n * int(b["video_lengths"].max()) <= 120
        assert b["skipped"] == {}
    keys = [k for b in batches for k in b["keys"]]
    assert keys == corpus.keys["val"]               # one worker, one rank: exactly the shard order


@pytest.mark.parametrize("world_size,workers", [(1, 2), (2, 2), (2, 1), (4, 1)])
def test_eval_sees_every_sample_exactly_once(corpus, world_size, workers):
    cfg = _cfg(corpus.folder, num_workers=workers)
    keys = []
    for rank in range(world_size):
        run1 = _keys(build_eval_loader(cfg, STREAMS, "val", rank, world_size))
        assert run1 == _keys(build_eval_loader(cfg, STREAMS, "val", rank, world_size))    # stable order
        keys.extend(run1)
    assert Counter(keys) == Counter(corpus.keys["val"])


@pytest.mark.parametrize("world_size", [5, 7])
def test_eval_with_fewer_shards_than_ranks_splits_by_sample(corpus, world_size):
    # 4 val shards, more ranks: every rank reads all shards and keeps the keys hashed to it
    cfg = _cfg(corpus.folder, num_workers=2)
    per_rank = [_keys(build_eval_loader(cfg, STREAMS, "val", rank, world_size)) for rank in range(world_size)]
    keys = [k for part in per_rank for k in part]
    assert Counter(keys) == Counter(corpus.keys["val"])
    assert sum(1 for part in per_rank if part) > 1          # the work really is spread


def test_eval_with_fewer_shards_than_ranks_x_workers_reduces_workers(corpus, caplog):
    cfg = _cfg(corpus.folder, num_workers=4)
    with caplog.at_level(logging.WARNING, logger="trainer.data.pipeline"):
        loader = build_eval_loader(cfg, STREAMS, "val", 1, 2)       # rank 1 owns 2 of the 4 shards
    assert loader.num_workers == 2 and "2 shard(s) for 4 workers" in caplog.text
    assert Counter(_keys(loader)) == Counter(corpus.keys["val"][3:6] + corpus.keys["val"][9:12])


def test_missing_index_or_shard_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard index for split 'nope'"):
        build_eval_loader(_cfg(corpus.folder), STREAMS, "nope", 0, 1)
    index = load_index(corpus.folder, "val")
    index.root = None
    index.save(tmp_path)                                      # an index whose shards are elsewhere
    with pytest.raises(FileNotFoundError, match="4 of 4 shards listed in the 'val' index are missing"):
        build_eval_loader(_cfg(tmp_path), STREAMS, "val", 0, 1)


def _train_keys(cfg, rank=0, world_size=1, epoch=0):
    loader = build_train_loader(cfg, STREAMS, rank, world_size, epoch)
    batches = [b["keys"] for b in loader]
    assert len(batches) == len(loader)
    return batches


def test_training_order_is_deterministic_per_seed_and_epoch(corpus):
    cfg = _cfg(corpus.folder, batches_per_epoch=6, num_workers=2)
    a = _train_keys(cfg)
    assert a == _train_keys(cfg)
    assert a != _train_keys(_cfg(corpus.folder, batches_per_epoch=6, num_workers=2, seed=1))
    assert a != _train_keys(cfg, epoch=1)
    assert a != _train_keys(cfg, rank=1, world_size=2)
    assert set(k for b in a for k in b) <= set(corpus.keys["train"])


def test_loaders_leave_the_global_torch_rng_alone(corpus):
    # a resumed run restores the RNG and then makes its loader; if that drew from the global RNG
    # the LoRA-dropout masks after a resume would differ from an uninterrupted run's
    import torch
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for loader in (build_train_loader(_cfg(corpus.folder, batches_per_epoch=2, num_workers=1), STREAMS, 0, 1),
                   build_eval_loader(_cfg(corpus.folder), STREAMS, "val", 0, 1)):
        next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


def test_training_epoch_length_is_the_same_on_every_rank(corpus):
    cfg = _cfg(corpus.folder, num_workers=2, samples_per_epoch=20)
    lengths = [len(_train_keys(cfg, rank, 3)) for rank in range(3)]
    assert lengths[0] >= 2 and len(set(lengths)) == 1
    # default: about the index's count per rank (15 clips, 2 ranks -> ~7 per rank)
    per_rank = [sum(len(b) for b in _train_keys(_cfg(corpus.folder), rank, 2)) for rank in range(2)]
    assert all(4 <= n <= 16 for n in per_rank), per_rank


@pytest.mark.parametrize("modality", ["asr", "vsr"])
def test_single_modality_batches_omit_the_other(corpus, modality):
    b = next(iter(build_eval_loader(_cfg(corpus.folder), ModelConfig(modality=modality).streams(), "val", 0, 1)))
    assert ("video" in b) == (modality == "vsr") and ("audio" in b) == (modality == "asr")
    assert b["frames"].tolist() and len(b["keys"]) == len(b["text"])


def test_babble_and_white_noise_change_audio_deterministically(corpus):
    clean = next(iter(build_train_loader(_cfg(corpus.folder, batches_per_epoch=3), STREAMS, 0, 1)))
    outs = {}
    for kind in ("white", "babble"):
        cfg = _cfg(corpus.folder, batches_per_epoch=3, noise=kind, noise_prob=1.0, snr_db=0.0)
        b1 = list(build_train_loader(cfg, STREAMS, 0, 1))
        b2 = list(build_train_loader(cfg, STREAMS, 0, 1))
        assert all((x["audio"] == y["audio"]).all() for x, y in zip(b1, b2))
        assert b1[0]["keys"] == clean["keys"]                      # noise does not change the order
        outs[kind] = b1
    # same clips, different audio; the first clip of a babble stream has no earlier clips to mix
    assert not (outs["white"][0]["audio"] == clean["audio"]).all()
    assert not (outs["babble"][-1]["audio"] == outs["white"][-1]["audio"]).all()
    assert (outs["white"][0]["video"] == clean["video"]).all()


def test_eval_babble_reaches_every_clip_from_the_first(corpus):
    """Evaluation under babble (launch/evaluate.py --snr): the reservoir is filled before mixing, so
    the first clip of each stream is noisy too; the clips and their order stay those of the clean pass."""
    clean = list(build_eval_loader(_cfg(corpus.folder), STREAMS, "val", 0, 1))
    cfg = _cfg(corpus.folder, noise="babble", noise_prob=1.0, snr_db=0.0, noise_in_eval=True)
    noisy = list(build_eval_loader(cfg, STREAMS, "val", 0, 1))
    assert [b["keys"] for b in noisy] == [b["keys"] for b in clean]
    for c, n in zip(clean, noisy):
        for i in range(len(c["keys"])):
            assert not np.array_equal(c["audio"][i].numpy(), n["audio"][i].numpy()), c["keys"][i]


# ---------------------------------------------------------------- bad input

def _wav(audio, sr):
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """split "bad": shard 0 mixes good clips with one of each bad kind; shard 1 is truncated in the
    middle of its 3rd clip's mp4 (short read); shard 2 has a corrupt tar header before its 2nd clip."""
    folder = tmp_path_factory.mktemp("bad")
    good = [make_sample(f"good{i}", 12 + i, seed=40 + i) for i in range(3)]
    _, a8k = make_clip(10, seed=9, sr=8000)
    video, _ = make_clip(10, seed=9)
    bad = [
        dict(make_sample("trunc_mp4", 10, seed=10), mp4=make_sample("x", 30, seed=11)["mp4"][:2000]),
        dict(make_sample("garbage_mp4", 10, seed=12),
             mp4=np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes()),
        {"__key__": "wav_8k", "mp4": encode_mp4(video), "wav": _wav(a8k, 8000), "txt": b"eight k"},
        dict(make_sample("empty_wav", 10, seed=13), wav=_wav(np.zeros(0, np.float32), 16000)),
        {k: v for k, v in make_sample("no_mp4", 10, seed=14).items() if k != "mp4"},
        dict(make_sample("empty_txt", 10, seed=15), txt=b"  \n"),
        make_sample("too_long", 60, seed=16),
        dict(make_sample("garbage_wav", 10, seed=17), wav=b"RIFF\x00\x00garbage"),
    ]
    shard0 = [good[0]] + bad[:4] + [good[1]] + bad[4:] + [good[2]]
    shard1 = [make_sample(f"s1_{i}", 10, seed=50 + i) for i in range(4)]
    shard2 = [make_sample(f"s2_{i}", 10, seed=60 + i) for i in range(3)]
    index = write_shards(folder, "bad", [shard0, shard1, shard2])
    # shard 1: cut inside s1_2.mp4 -> a short read; s1_2 arrives without its mp4 and s1_3 never
    path1 = Path(index.urls[1])
    with tarfile.open(path1) as tf:
        m = tf.getmember("s1_2.mp4")
    path1.write_bytes(path1.read_bytes()[:m.offset_data + m.size // 2])
    # shard 2: overwrite the header of s2_1's first member; tarfile then stops without an error
    path2 = Path(index.urls[2])
    with tarfile.open(path2) as tf:
        m = tf.getmember("s2_1.json")
    raw = bytearray(path2.read_bytes())
    raw[m.offset:m.offset + 512] = b"\x13" * 512
    path2.write_bytes(bytes(raw))
    return folder


def test_bad_samples_are_skipped_and_counted_by_reason(bad_shards):
    counter = SkipCounter()
    cfg = _cfg(bad_shards, max_clip_frames=50, strict_sample_rate=True, num_workers=0)
    keys = _keys(build_eval_loader(cfg, STREAMS, "bad", 0, 1), counter)
    assert keys == ["good0", "good1", "good2", "s1_0", "s1_1", "s2_0"]
    assert counter.counts["video_decode"] == 2            # truncated and garbage mp4
    assert counter.counts["audio_sample_rate"] == 1
    assert counter.counts["audio_empty"] == 1
    assert counter.counts["audio_decode"] == 1
    assert counter.counts["missing_video"] == 2           # no_mp4, and s1_2 cut before its mp4
    assert counter.counts["empty_text"] == 1
    assert counter.counts["too_long"] == 1
    assert counter.counts["tar_error"] >= 1               # the short read in shard 1
    assert counter.counts["shard_short"] == 1 + 2         # s1_3; s2_1 and s2_2 after the bad header
    assert set(counter.counts) <= {"video_decode", "audio_sample_rate", "audio_empty", "audio_decode",
                                   "missing_video", "empty_text", "too_long", "tar_error", "shard_short"}


def test_non_strict_resamples_8k_audio_and_notes_it(bad_shards):
    counter = SkipCounter()
    keys = _keys(build_eval_loader(_cfg(bad_shards, max_clip_frames=50), STREAMS, "bad", 0, 1), counter)
    assert "wav_8k" in keys and counter.counts["resampled_audio"] == 1
    assert "audio_sample_rate" not in counter.counts


def test_training_survives_bad_shards_and_reports_skips(bad_shards):
    counter = SkipCounter()
    cfg = _cfg(bad_shards, train_split="bad", max_clip_frames=50, batches_per_epoch=6, num_workers=2)
    keys = _keys(build_train_loader(cfg, STREAMS, 0, 1), counter)
    assert keys and not {"trunc_mp4", "garbage_mp4", "no_mp4", "empty_txt", "too_long"} & set(keys)
    assert counter.total > 0 and counter.counts["video_decode"] > 0


def test_unusable_shard_set_is_a_clear_error(tmp_path):
    samples = [dict(make_sample(f"k{i}", 8, seed=i), mp4=b"not a video") for i in range(4)]
    write_shards(tmp_path, "train", [samples, samples])
    cfg = _cfg(tmp_path, max_initial_failures=6, batches_per_epoch=2)
    with pytest.raises(UnusableDataError, match="6 samples failed before any decoded.*video_decode"):
        next(iter(build_train_loader(cfg, STREAMS, 0, 1)))      # resampled: would loop forever without the check


def test_one_corrupt_shard_does_not_stop_training(tmp_path):
    """A shard whose header is garbage is counted (tar_error, shard_short for all it promised), not
    taken for an unusable shard set, even when it holds more samples than max_initial_failures."""
    good = [make_sample(f"g{i}", 8, seed=i) for i in range(4)]
    bad = [make_sample(f"b{i}", 8, seed=10 + i) for i in range(12)]
    write_shards(tmp_path, "train", [bad, good])
    shard0 = tmp_path / "train-000000.tar"
    raw = bytearray(shard0.read_bytes())
    raw[:512] = b"\xff" * 512
    shard0.write_bytes(bytes(raw))
    counter = SkipCounter()
    cfg = _cfg(tmp_path, max_initial_failures=6, batches_per_epoch=3, shuffle_shards=False)
    keys = _keys(build_train_loader(cfg, STREAMS, 0, 1), counter)
    assert keys and all(k.startswith("g") for k in keys)
    assert counter.counts["shard_short"] >= 12 and counter.sample_failures == 0


def test_a_shard_set_of_non_tars_is_a_clear_error(tmp_path):
    write_shards(tmp_path, "train", [[make_sample(f"k{i}", 8, seed=i)] for i in range(3)])
    for tar in tmp_path.glob("train-*.tar"):
        tar.write_bytes(b"this is not a tar file" * 100)
    cfg = _cfg(tmp_path, batches_per_epoch=2)
    with pytest.raises(UnusableDataError, match="none of the 3 shards delivered a sample"):
        next(iter(build_train_loader(cfg, STREAMS, 0, 1)))      # resampled: would loop forever without the check


# ---------------------------------------------------------------- real multi-process runs

@pytest.mark.slow
def test_eval_exactly_once_under_torchrun_2_ranks_x_2_workers(corpus, tmp_path):
    out = tmp_path / "keys.json"
    run(command(REPO / "tests" / "support" / "data_dist_eval.py", "--shard-dir", str(corpus.folder), "--split", "val",
                "--workers", "2", "--out", str(out), launcher="torchrun", nproc=2), timeout=300)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2 and all(per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert Counter(per_rank[0] + per_rank[1]) == Counter(corpus.keys["val"])


@pytest.mark.slow
def test_reads_the_corpus_tools_shards(synth_corpus):
    """The shards written by data_tools (espeak-ng speech) decode and batch here."""
    counter = SkipCounter()
    cfg = _cfg(synth_corpus, max_frames_per_batch=3000, max_clip_frames=750, num_workers=0)
    index = load_index(synth_corpus, "train")
    keys = _keys(build_eval_loader(cfg, STREAMS, "train", 0, 1), counter)
    assert len(keys) == index.num_samples and counter.total == 0, counter.report()
