"""The synthetic corpus, the shard writer and the validator (data_tools/)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_tools import cli
from data_tools.media import encode_wav
from data_tools.mouth import mouth_opening_from_frames, parse_phonemes
from data_tools.shards import Sample, SkipSample, check_key, plan_shards, write_split
from data_tools.synth import GRID_SIZE, GRID_WORDS, build_corpus, grid_sentence, plan_corpus
from data_tools.validate import iter_samples, validate
from tests.constants import REPO
from tests.helpers import child_env
from trainer.data.shard_format import SAMPLES_PER_FRAME, decode_audio, decode_video, load_index, resample

NUM = 30
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="needs espeak-ng and ffmpeg")


def read_split(root: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    index = load_index(root, split)
    return [s for url in index.urls for s in iter_samples(Path(url))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    build_corpus(out, NUM, seed=0, workers=2, samples_per_shard=8, progress=False)
    return out


# ------------------------------------------------------------ grammar and planning

def test_grid_grammar():
    assert grid_sentence(0) == "bin blue at a zero again"
    assert grid_sentence(GRID_SIZE - 1) == "set white with z nine soon"
    assert GRID_SIZE == 4 * 4 * 4 * 25 * 10 * 4 and "w" not in GRID_WORDS[3]
    sentences = {grid_sentence(i) for i in range(0, GRID_SIZE, 997)}
    assert len(sentences) == len(range(0, GRID_SIZE, 997))          # the mixed radix is a bijection
    with pytest.raises(ValueError):
        grid_sentence(GRID_SIZE)


def test_plan_is_seeded_and_split_by_sentence():
    a, b, c = plan_corpus(60, seed=3), plan_corpus(60, seed=3), plan_corpus(60, seed=4)
    assert a.utterances == b.utterances
    assert a.utterances != c.utterances
    texts = {s: {u.text for u in utts} for s, utts in a.utterances.items()}
    assert all(texts.values()) and sum(len(u) for u in a.utterances.values()) == 60
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])

    # a given sentence list spoken several times: every repeat stays in its sentence's split
    sents = [f"sentence number {i}" for i in range(10)]
    plan = plan_corpus(40, seed=0, sentences=sents + sents[:3])     # duplicates are dropped
    where: dict[str, set[str]] = {}
    for split, utts in plan.utterances.items():
        for u in utts:
            where.setdefault(u.text, set()).add(split)
    assert set(where) == set(sents) and all(len(s) == 1 for s in where.values())
    assert all(plan.utterances[s] for s in ("train", "val", "test"))
    with pytest.raises(ValueError):
        plan_corpus(10, seed=0, sentences=["only one", "two"])      # too few for three splits


def test_espeak_speaks_text_that_starts_with_a_dash(tmp_path):
    from data_tools.synth import VOICES, espeak

    phonemes = espeak("-5 degrees today", VOICES[0], 160, 50, tmp_path / "a.wav")   # not an option
    assert "f_'aI_v" in phonemes and (tmp_path / "a.wav").stat().st_size > 1000


def test_phonemes_to_visemes():
    # espeak-ng -x --sep=_ for "place blue now"
    assert parse_phonemes("p_l_'eI_s b_l_'u: n_'aU") == [
        "closed", "other", "mid", "spread", "sibilant", "closed", "other", "rounded", "other", "open", "rounded"]
    assert parse_phonemes("f_'aI_v T_r_'i:") == ["labiodental", "open", "spread", "labiodental", "dental", "other",
                                                "spread"]


def test_resample_is_band_limited():
    sr = 22050
    t = np.arange(sr) / sr
    y = resample(np.sin(2 * np.pi * 1000 * t).astype(np.float32), sr, 16000)
    assert len(y) == 16000
    ref = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(y[100:-100] - ref[100:-100]).max() < 1e-3
    alias = resample(np.sin(2 * np.pi * 10000 * t).astype(np.float32), sr, 16000)   # above 8 kHz: removed
    assert np.sqrt(np.mean(alias[100:-100] ** 2)) < 1e-3


# ------------------------------------------------------------ the built corpus

def test_index_matches_tars(corpus):
    total = 0
    for split in ("train", "val", "test"):
        index = load_index(corpus, split)
        assert index.shards, split
        for info, url in zip(index.shards, index.urls):
            samples = list(iter_samples(Path(url)))
            assert info.samples == len(samples) <= 8
            durations = [json.loads(p["json"])["duration"] for _, p in samples]
            assert info.duration == pytest.approx(sum(durations), abs=1e-3)
        total += index.num_samples
    assert total == NUM
    assert not list(corpus.glob(".tmp-*")), "temporary shards left behind"


def test_samples_are_complete_and_aligned(corpus):
    for split in ("train", "val", "test"):
        for key, parts in read_split(corpus, split):
            check_key(key)
            assert set(parts) == {"wav", "mp4", "txt", "json"}
            meta = json.loads(parts["json"])
            assert meta["split"] == split and meta["dataset"] == "synth" and meta["fps"] == 25
            audio, ainfo = decode_audio(parts["wav"])
            frames, vinfo = decode_video(parts["mp4"])
            assert (ainfo.sample_rate, ainfo.channels) == (16000, 1)
            assert (vinfo.height, vinfo.width, vinfo.fps) == (96, 96, 25.0)
            assert vinfo.num_frames == len(frames) == meta["num_frames"]
            assert ainfo.num_samples == meta["num_frames"] * SAMPLES_PER_FRAME       # exact, by construction
            assert np.abs(audio).max() > 0.05                                          # real speech, not silence
            assert parts["txt"].decode() == grid_text(parts["txt"].decode())


def grid_text(text: str) -> str:
    words = text.split()
    assert len(words) == 6 and all(w in options for w, options in zip(words, GRID_WORDS)), text
    return text


def test_split_is_disjoint_by_sentence(corpus):
    texts = {s: {p["txt"].decode() for _, p in read_split(corpus, s)} for s in ("train", "val", "test")}
    assert texts["train"] and texts["val"] and texts["test"]
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])


def test_same_seed_same_bytes(corpus, tmp_path):
    # a different worker count must not change anything: the shard plan depends on the inputs only
    build_corpus(tmp_path, NUM, seed=0, workers=1, samples_per_shard=8, progress=False)
    for split in ("train", "val", "test"):
        a, b = load_index(corpus, split), load_index(tmp_path, split)
        assert [s.name for s in a.shards] == [s.name for s in b.shards]
        for ua, ub in zip(a.urls, b.urls):
            assert Path(ua).read_bytes() == Path(ub).read_bytes(), ua
    other = plan_corpus(NUM, seed=1)
    assert [u.text for u in other.utterances["train"]] != [p["txt"].decode() for _, p in read_split(corpus, "train")]


def test_same_command_twice_same_bytes(tmp_path):
    """`python -m data_tools synth` run twice as fresh processes (cold espeak-ng, ffmpeg and pool
    start-up, another thread budget and working folder): every file of the two folders is the
    same byte for byte, and the videos carry no encoder-version tag (bitexact muxing)."""
    def build(out: Path, cwd: Path, threads: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.run([sys.executable, "-m", "data_tools", "synth", "--out", str(out), "--num", "9",
                            "--seed", "0", "--samples-per-shard", "2", "--quiet"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]

    (tmp_path / "a").mkdir()
    build(tmp_path / "one", tmp_path / "a", "1")
    build(tmp_path / "two", tmp_path, "2")
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(files) > 6
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    first = next(iter_samples(tmp_path / "one" / "train-000000.tar"))[1]
    assert b"Lavf" not in first["mp4"] and first["mp4"][4:8] == b"ftyp"
    with tarfile.open(tmp_path / "one" / "train-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar.getmembers()} == {(0, 0, 0, "avsr", 0o444)}


def test_mouth_follows_the_audio(corpus):
    """The rendered opening (dark cavity pixels) tracks the speech envelope, frame by frame, in time."""
    corrs, shifted = [], []
    for _, parts in read_split(corpus, "train")[:12]:
        audio, _ = decode_audio(parts["wav"])
        frames, _ = decode_video(parts["mp4"])
        envelope = np.sqrt((audio.reshape(-1, SAMPLES_PER_FRAME) ** 2).mean(axis=1))
        opening = mouth_opening_from_frames(frames)
        corrs.append(np.corrcoef(envelope, opening)[0, 1])
        # the same pair 4 frames (160 ms) out of sync must agree clearly less
        shifted.append(np.mean([np.corrcoef(envelope[4:], opening[:-4])[0, 1],
                                np.corrcoef(envelope[:-4], opening[4:])[0, 1]]))
    assert np.mean(corrs) > 0.6 and min(corrs) > 0.3, corrs
    assert np.mean(corrs) > np.mean(shifted) + 0.2, (np.mean(corrs), np.mean(shifted))


def test_lip_shape_follows_the_visemes(corpus):
    """Rounded vowels draw a narrower mouth than open ones: shape carries phoneme identity."""
    widths: dict[str, list[float]] = {"rounded": [], "open": []}
    for _, parts in read_split(corpus, "train"):
        frames, _ = decode_video(parts["mp4"])
        visemes = json.loads(parts["json"])["visemes"]
        for frame, vis in zip(frames, visemes):
            if vis in widths:
                cols = np.flatnonzero((frame[20:76] < 50).sum(axis=0) > 0)
                if len(cols) > 3:
                    widths[vis].append(cols[-1] - cols[0])
    assert len(widths["rounded"]) > 10 and len(widths["open"]) > 10
    assert np.mean(widths["rounded"]) < 0.8 * np.mean(widths["open"]), {k: np.mean(v) for k, v in widths.items()}


# ------------------------------------------------------------ validation

def test_validate_accepts_the_corpus(corpus):
    report = validate(corpus)
    assert report.ok, report.format()
    assert set(report.splits) == {"train", "val", "test"}
    assert sum(s.num_samples for s in report.splits.values()) == NUM


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a tar with edit(key, parts) applied to each sample."""
    samples = list(iter_samples(path))
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            edit(key, parts)
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_validate_flags_corruption(corpus, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    shard = bad / "train-000000.tar"
    keys = [k for k, _ in iter_samples(shard)]

    def corrupt(key, parts):
        if key == keys[0]:
            parts["mp4"] = parts["mp4"][: len(parts["mp4"]) // 2]               # truncated video
        elif key == keys[1]:
            audio, _ = decode_audio(parts["wav"])
            parts["wav"] = encode_wav(audio[::2], 8000)                         # wrong sample rate
        elif key == keys[2]:
            parts["txt"] = b"  \n"                                              # empty transcript
        elif key == keys[3]:
            parts["json"] = b"{not json"
        elif key == keys[4]:
            del parts["mp4"]
    rewrite_shard(shard, corrupt)
    (bad / "val-000009.tar").write_bytes((bad / "val-000000.tar").read_bytes())  # not in the index
    (bad / "test-000000.tar").unlink()                                            # listed but missing

    report = validate(bad)
    assert not report.ok
    msgs: dict[tuple[str, str | None], str] = {}
    for p in report.problems:
        msgs[(p.shard, p.key)] = msgs.get((p.shard, p.key), "") + p.message + "; "
    text = "\n".join(str(p) for p in report.problems)
    assert "video does not decode" in msgs[(shard.name, keys[0])], text
    assert "audio sample rate 8000" in msgs[(shard.name, keys[1])], text
    assert msgs[(shard.name, keys[2])] == "empty transcript; "
    assert "json does not parse" in msgs[(shard.name, keys[3])]
    assert "missing mp4" in msgs[(shard.name, keys[4])]
    assert ("val-000009.tar", None) in msgs and ("test-000000.tar", None) in msgs
    assert not any(p.key == keys[5] for p in report.problems), "a good sample was flagged"

    # the index must agree with the tars
    index = json.loads((bad / "val.index.json").read_text())
    index["shards"][0]["samples"] += 1
    (bad / "val.index.json").write_text(json.dumps(index))
    assert any("index says" in p.message for p in validate(bad, ["val"]).problems)


def test_validate_cli_exit_codes(corpus, tmp_path):
    env = child_env()
    ok = subprocess.run([sys.executable, "-m", "data_tools", "validate", str(corpus), "--split", "val"],
                        capture_output=True, text=True, env=env, cwd=REPO)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "bad"
    shutil.copytree(corpus, bad)
    rewrite_shard(bad / "val-000000.tar", lambda key, parts: parts.update(txt=b""))
    fail = subprocess.run([sys.executable, "-m", "data_tools", "validate", str(bad), "--split", "val"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert fail.returncode == 1 and "empty transcript" in fail.stdout and "FAILED" in fail.stdout


def test_every_cli_flag_has_help():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices)      # the subcommand action
    assert set(subparsers.choices) == {"synth", "lrs3", "validate", "pretrained"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


# ------------------------------------------------------------ the shard writer itself

class Item:
    def __init__(self, key: str):
        self.key = key


def tiny_sample(item: Item) -> Sample:
    if item.key.startswith("skip"):
        raise SkipSample("unwanted", item.key)
    if item.key == "boom":
        raise RuntimeError("producer bug")
    return Sample(key=item.key, wav=encode_wav(np.zeros(640, np.float32)), mp4=b"not a video", txt=item.key,
                  meta={"duration": 0.04})


def test_plan_shards_limits():
    assert plan_shards([1] * 7, None, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert plan_shards([4, 4, 4, 10, 1], 8, None) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert plan_shards([], 8, 3) == []
    with pytest.raises(ValueError):
        plan_shards([1], None, 0)


def test_write_split_skips_compacts_and_is_atomic(tmp_path):
    items = [Item(k) for k in ["a", "skip1", "skip2", "skip3", "b", "c"]]
    res = write_split(items, tiny_sample, tmp_path, "train", max_samples=2, workers=1, progress=False)
    # the shard of skip2/skip3 is empty and dropped; numbering stays contiguous
    assert [s.name for s in res.index.shards] == ["train-000000.tar", "train-000001.tar"]
    assert [s.samples for s in res.index.shards] == [1, 2]
    assert res.skip_counts == {"unwanted": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train-000001.tar", "train.index.json"]

    with pytest.raises(FileExistsError):
        write_split(items, tiny_sample, tmp_path, "train", workers=1, progress=False)
    # a producer error during --overwrite leaves neither a partial shard nor a temporary file, and the
    # old split exactly as it was: nothing old is removed before the new split is complete
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="producer bug"):
        write_split([Item("x"), Item("boom")], tiny_sample, tmp_path, "train", overwrite=True, workers=1,
                    progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a successful overwrite replaces it
    res = write_split([Item("x")], tiny_sample, tmp_path, "train", overwrite=True, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar", "train.index.json"]
    assert res.index.num_samples == 1
    for p in list(tmp_path.iterdir()):
        p.unlink()
    # keys longer than a USTAR name (100 bytes) are fine
    long_key = "spk_" + "x" * 120
    res = write_split([Item(long_key)], tiny_sample, tmp_path, "long", workers=1, progress=False)
    with tarfile.open(tmp_path / "long-000000.tar") as tar:
        assert {n.rsplit(".", 1)[0] for n in tar.getnames()} == {long_key}
    with pytest.raises(ValueError, match="invalid sample key"):
        write_split([Item("a.b")], tiny_sample, tmp_path, "train", workers=1, progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        write_split([Item("a"), Item("a")], tiny_sample, tmp_path, "train", workers=1, progress=False)


def test_webdataset_reads_the_shards(corpus):
    wds = pytest.importorskip("webdataset")
    index = load_index(corpus, "val")
    samples = list(wds.WebDataset(index.urls, shardshuffle=False, empty_check=False).decode())
    assert len(samples) == index.num_samples
    for s in samples:
        assert {"__key__", "wav", "mp4", "txt", "json"} <= set(s)
        assert isinstance(s["txt"], str) and isinstance(s["json"], dict) and isinstance(s["mp4"], bytes)
        assert s["json"]["num_frames"] * SAMPLES_PER_FRAME == decode_audio(s["wav"])[1].num_samples


def test_worker_error_in_the_pool_leaves_nothing(tmp_path):
    items = [Item(f"k{i}") for i in range(6)] + [Item("boom")] + [Item(f"z{i}") for i in range(6)]
    with pytest.raises(RuntimeError, match="producer bug"):
        write_split(items, tiny_sample, tmp_path, "train", max_samples=2, workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []
    res = write_split(items[:6], tiny_sample, tmp_path, "train", max_samples=2, workers=2, progress=False)
    assert [s.samples for s in res.index.shards] == [2, 2, 2]
