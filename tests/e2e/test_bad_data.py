"""Bad data made visible, with real processes: a 2-process ZeRO-3 run (torchrun, gloo, the tiny model, 2
DataLoader workers a rank) on a copy of the synthetic corpus whose every train shard and the val shard
hold a sample with garbage audio, and a blank transcript in the first train shard. The skipped samples of
all ranks and workers are in the console at log steps and after the evaluation, and the tokenizer's
count of transcripts. (Damaged checkpoints and what resume does with them, in one process:
tests/trainer/engine/test_checkpoint.py; a run killed and resumed: tests/e2e/test_resume.py.)
"""
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.helpers import TINY_DATA, train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]   # 2-process runs; slow on a loaded 2-core machine
ARGS = [*TINY_DATA, "--data.num-workers", "2",    # 2 DataLoader workers a rank
        "--train.max-steps", "4", "--train.log-every", "1",
        "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "0", "--train.eval-max-new-tokens",
        "4", "--train.final-eval-splits", "val", "--train.eval-untrained", "False", "--train.export-on-finish",
        "False", "--monitor.every", "0", "--tracking.enabled", "False"]
BROKEN_WAV = 2          # in every train shard and the val shard: this sample's audio is garbage
BLANK_TXT = 4           # in the first train shard: this sample's transcript is blank


def _rewrite_tar(path: Path, change) -> None:
    """Rewrite a shard with `change(sample_number, member_name, data) -> data` applied."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    keys = list(dict.fromkeys(m.name.rsplit(".", 1)[0] for m, _ in members))
    with tarfile.open(path, "w") as out:
        for m, data in members:
            data = change(keys.index(m.name.rsplit(".", 1)[0]), m.name, data)
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))


def _broken_corpus(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)

    def garbage_wav(i, name, data):
        return os.urandom(len(data)) if i == BROKEN_WAV and name.endswith(".wav") else data

    for shard in sorted(dst.glob("train-*.tar")) + sorted(dst.glob("val-*.tar")):
        _rewrite_tar(shard, garbage_wav)
    _rewrite_tar(dst / "train-000000.tar",
                 lambda i, name, data: b"  \n" if i == BLANK_TXT and name.endswith(".txt") else data)
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory, synth_corpus):
    root = tmp_path_factory.mktemp("bad_data")
    corpus = _broken_corpus(synth_corpus, root / "corpus")
    run = root / "run"
    p = train(run, corpus, *ARGS)
    return run, corpus, p.stdout + p.stderr


def test_skipped_data_is_reported_in_the_console(base):
    run, corpus, out = base
    total = json.loads((corpus / "train.index.json").read_text())
    expected = sum(s["samples"] for s in total["shards"])
    assert f"BPE tokenizer on {expected - 1} of {expected} transcripts" in out
    assert f"{expected} training samples gave no transcript" in out
    lines = [ln for ln in out.splitlines() if "data, all ranks, since the last log:" in ln]
    assert lines and all(re.search(r"\d+ samples skipped \((audio_decode|empty_text) \d+", ln) for ln in lines)
    # evaluation at the end: the val shard's broken clip, counted and named
    assert re.search(r"val avsr WER .* on \d+ utterances; skipped: 1 samples skipped \(audio_decode 1\)", out), \
        out[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["val"]["skipped"] == 1 and results["val"]["skipped/audio_decode"] == 1
