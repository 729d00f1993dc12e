"""Faults in a real run folder: damaged, planted and superseded checkpoints; bad data made visible.

One real 2-process ZeRO-3 run (torchrun, gloo, the tiny model) on a copy of the synthetic corpus with
broken samples is trained once per module; each fault test copies its folder, damages the copy with
real file operations and resumes it with real processes:

- the newest checkpoint truncated and an optimizer-state file of the one before deleted: resume says
  which files failed and why, falls back to the newest that verifies, sets the others aside (kept)
  and reproduces the uninterrupted run's losses;
- a pickle that would run code planted in rng_rank0.pt (the trainer's own file) of the newest
  checkpoint and in a DeepSpeed optimizer-state file of the one before, their manifest entries forged
  to match: both refused before anything unpickles them, the marker file never appears;
- `--train.resume` to an older checkpoint: the newer ones are moved aside, the retrained steps saved;
- the skipped samples of all ranks and workers in the console, at log steps and after evaluation,
  and the tokenizer's count of transcripts.
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.untrusted import RunsCode

pytestmark = pytest.mark.slow
STEPS = 6
ARGS = ["--data.num-workers", "2", "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4",
        "--data.batches-per-epoch", "4", "--train.max-steps", str(STEPS), "--train.log-every", "1",
        "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "2", "--train.keep-last", "3",
        "--train.eval-max-new-tokens", "4", "--train.test-at-end", "False", "--train.eval-untrained", "False",
        "--train.export-on-finish", "False", "--monitor.every", "0", "--tracking.enabled", "False"]
OPTIM = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
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


def _train(run_dir: Path, corpus: Path, *extra: str) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
           "--data.shard-dir", str(corpus), "--train.run-dir", str(run_dir), *ARGS, *extra]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"training failed:\n{out[-8000:]}"
    return out


def _losses(out: str) -> dict[int, str]:
    return {int(m[1]): m[2] for m in re.finditer(r"step (\d+)/\d+ loss (\S+)", out)}


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def base(tmp_path_factory, synth_corpus):
    root = tmp_path_factory.mktemp("reliability")
    corpus = _broken_corpus(synth_corpus, root / "corpus")
    run = root / "base"
    out = _train(run, corpus)
    return run, corpus, out


def _copy(base, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base[0], run)
    return run


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "MANIFEST.json").read_text())


def test_every_checkpoint_has_a_manifest_that_verifies(base):
    from trainer.engine.checkpoint import verify
    run, _, _ = base
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006"]
    for folder in (run / "checkpoints").glob("step_*"):
        listed = _manifest(folder)["files"]
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert sorted([*listed, "MANIFEST.json"]) == sorted(on_disk)
        assert {OPTIM.format(0), OPTIM.format(1), "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"} <= set(listed)
        assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in listed.values())
        assert verify(folder) == []


def test_damaged_checkpoints_are_rejected_and_resume_falls_back(base, tmp_path):
    run, corpus, out = base
    run = _copy(base, tmp_path)
    ck = run / "checkpoints"
    model_file = next((ck / "step_00000006").glob("*model_states.pt"))
    size = model_file.stat().st_size
    with open(model_file, "r+b") as f:                  # a truncated model-state file
        f.truncate(size // 2)
    (ck / "step_00000004" / OPTIM.format(1)).unlink()  # a deleted optimizer-state file
    resumed = _train(run, corpus)
    assert re.search(rf"step_00000006 rejected: {model_file.name}: {size // 2} bytes, the manifest says {size}",
                     resumed), resumed[-4000:]
    assert re.search(rf"step_00000004 rejected: {OPTIM.format(1)}: missing", resumed)
    assert "resumed from" in resumed and "step_00000002 at step 2" in resumed
    # the rejected checkpoints are kept, with the reason, and the retrained steps are saved
    aside = list((ck / "set_aside").glob("*/step_*"))
    assert sorted(p.name for p in aside) == ["step_00000004", "step_00000006"]
    why = (aside[0].parent / "WHY.txt").read_text()
    assert "missing" in why and "the manifest says" in why
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006"]
    assert (ck / "latest").read_text().strip() == "step_00000006"
    from trainer.engine.checkpoint import verify
    assert verify(ck / "step_00000006") == [] and verify(ck / "step_00000004") == []
    # exact resume from the fallback: steps 3..6 as in the uninterrupted run
    base_losses, new = _losses(out), _losses(resumed)
    assert sorted(new) == [3, 4, 5, 6] and all(new[s] == base_losses[s] for s in new), (base_losses, new)


def _forge(folder: Path, name: str, marker: Path) -> None:
    """Plant a code-running pickle as `name` and rewrite its manifest entry to match (an attacker can)."""
    from trainer.engine.checkpoint import file_digest
    torch.save({"rng": RunsCode(marker)}, folder / name)
    manifest = _manifest(folder)
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_planted_pickles_are_refused_before_anything_unpickles_them(base, tmp_path):
    run, corpus, _ = base
    run = _copy(base, tmp_path)
    ck = run / "checkpoints"
    marker = tmp_path / "pwned"
    _forge(ck / "step_00000006", "rng_rank0.pt", marker)       # the trainer's own per-rank file
    _forge(ck / "step_00000004", OPTIM.format(1), marker)      # a file DeepSpeed unpickles itself
    resumed = _train(run, corpus)
    assert not marker.exists()
    assert "step_00000006 rejected: rng_rank0.pt: refused: not loadable with weights_only=True" in resumed
    assert f"step_00000004 rejected: {OPTIM.format(1)}: refused: not loadable with weights_only=True" in resumed
    assert "step_00000002 at step 2" in resumed


def test_resume_from_an_older_checkpoint_sets_the_newer_aside(base, tmp_path):
    run, corpus, out = base
    run = _copy(base, tmp_path)
    ck = run / "checkpoints"
    old6 = _manifest(ck / "step_00000006")
    resumed = _train(run, corpus, "--train.resume", str(ck / "step_00000002"))
    assert "moved step_00000004" in resumed and "moved step_00000006" in resumed
    assert "newer than step_00000002, which --train.resume asked for" in resumed
    aside = list((ck / "set_aside").glob("*-newer-than-step_00000002/step_*"))
    assert sorted(p.name for p in aside) == ["step_00000004", "step_00000006"]
    assert _manifest(next(p for p in aside if p.name == "step_00000006")) == old6      # kept as it was
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006"]
    assert "already complete" not in resumed
    base_losses, new = _losses(out), _losses(resumed)
    assert sorted(new) == [3, 4, 5, 6] and all(new[s] == base_losses[s] for s in new), (base_losses, new)


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
