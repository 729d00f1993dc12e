"""Faults in a real run folder: damaged, planted and superseded checkpoints; bad data made visible.

One real 2-process ZeRO-3 run (torchrun, gloo, the tiny model) on a copy of the synthetic corpus with
broken samples is trained once per module; each fault test copies its folder, damages the copy with
real file operations and resumes it with real processes:

- the newest checkpoint truncated, an optimizer-state file of the one before deleted, and pickles that
  would run code planted in the one before that (rng_rank0.pt, the trainer's own file, and a DeepSpeed
  optimizer-state file, their manifest entries forged to match): resume names each file and why, runs no
  planted code, falls back to the newest checkpoint that verifies, sets the others aside (kept) and
  reproduces the uninterrupted run's losses; a flipped byte is caught by the checksum;
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

from tests.constants import REPO
from tests.support.untrusted import RunsCode

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]   # 2-process runs; slow on a loaded 2-core machine
STEPS = 8
ARGS = ["--train.device", "cpu", "--data.num-workers", "2", "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4",
        "--data.batches-per-epoch", "4", "--train.max-steps", str(STEPS), "--train.log-every", "1",
        "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "2", "--train.keep-last", "4",
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "launch" / "train.py"), "--config", str(REPO / "ds_configs" / "zero3.json"),
           "--data.shard-dir", str(corpus), "--train.run-dir", str(run_dir), *ARGS, *extra]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
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


def test_every_checkpoint_has_a_manifest_that_verifies(base, tmp_path):
    from trainer.engine.checkpoint import verify
    run, _, _ = base
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    for folder in (run / "checkpoints").glob("step_*"):
        listed = _manifest(folder)["files"]
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert sorted([*listed, "MANIFEST.json"]) == sorted(on_disk)
        assert {OPTIM.format(0), OPTIM.format(1), "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"} <= set(listed)
        assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in listed.values())
        assert verify(folder) == []
    # one flipped byte, same size: the checksum catches it and names the file
    copy = tmp_path / "step_00000002"
    shutil.copytree(run / "checkpoints" / "step_00000002", copy)
    with open(copy / OPTIM.format(0), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify(copy) == [f"{OPTIM.format(0)}: sha256 differs from the manifest (file corrupted)"]


def _forge(folder: Path, name: str, marker: Path) -> None:
    """Plant a code-running pickle as `name` and rewrite its manifest entry to match (an attacker can)."""
    from trainer.engine.checkpoint import file_digest
    torch.save({"rng": RunsCode(marker)}, folder / name)
    manifest = _manifest(folder)
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))


def test_damaged_and_planted_checkpoints_are_rejected_and_resume_falls_back(base, tmp_path):
    """step 8: a model-state file truncated; step 6: an optimizer-state file deleted; step 4: code-running
    pickles planted as rng_rank0.pt (the trainer's own file) and as an optimizer-state file (one DeepSpeed
    unpickles itself), their manifest entries forged. Resume names each file and why, falls back to
    step 2, runs no planted code, keeps the rejected folders and reproduces the uninterrupted losses."""
    from trainer.engine.checkpoint import verify
    run, corpus, out = base
    run = _copy(base, tmp_path)
    ck = run / "checkpoints"
    model_file = sorted((ck / "step_00000008").glob("*model_states.pt"))[0]
    size = model_file.stat().st_size
    with open(model_file, "r+b") as f:
        f.truncate(size // 2)
    (ck / "step_00000006" / OPTIM.format(1)).unlink()
    marker = tmp_path / "pwned"
    _forge(ck / "step_00000004", "rng_rank0.pt", marker)
    _forge(ck / "step_00000004", OPTIM.format(1), marker)
    resumed = _train(run, corpus)
    assert not marker.exists()
    assert f"step_00000008 rejected: {model_file.name}: {size // 2} bytes, the manifest says {size}" in resumed, \
        resumed[-4000:]
    assert f"step_00000006 rejected: {OPTIM.format(1)}: missing" in resumed
    refused = "refused: not loadable with weights_only=True"
    assert re.search(rf"step_00000004 rejected: .*rng_rank0.pt: {refused}", resumed)
    assert re.search(rf"step_00000004 rejected: .*{OPTIM.format(1)}: {refused}", resumed)
    assert "step_00000002 at step 2" in resumed
    # the rejected checkpoints are kept, with the reasons, and the retrained steps are saved
    aside = list((ck / "set_aside").glob("*-rejected-resumed-from-step_00000002/step_*"))
    assert sorted(p.name for p in aside) == ["step_00000004", "step_00000006", "step_00000008"]
    why = (aside[0].parent / "WHY.txt").read_text()
    assert "missing" in why and "the manifest says" in why and refused in why
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    assert (ck / "latest").read_text().strip() == "step_00000008"
    assert all(verify(ck / s) == [] for s in _steps(run))
    base_losses, new = _losses(out), _losses(resumed)
    assert sorted(new) == list(range(3, STEPS + 1)) and all(new[s] == base_losses[s] for s in new), \
        (base_losses, new)


def test_resume_from_an_older_checkpoint_sets_the_newer_aside(base, tmp_path):
    run, corpus, out = base
    run = _copy(base, tmp_path)
    ck = run / "checkpoints"
    old8 = _manifest(ck / "step_00000008")
    resumed = _train(run, corpus, "--train.resume", str(ck / "step_00000004"))
    assert "moved step_00000006" in resumed and "moved step_00000008" in resumed
    assert "newer than step_00000004, which --train.resume asked for" in resumed
    aside = list((ck / "set_aside").glob("*-newer-than-step_00000004/step_*"))
    assert sorted(p.name for p in aside) == ["step_00000006", "step_00000008"]
    assert _manifest(next(p for p in aside if p.name == "step_00000008")) == old8      # kept as it was
    assert _steps(run) == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    assert "already complete" not in resumed                  # the retrained steps were saved
    base_losses, new = _losses(out), _losses(resumed)
    assert sorted(new) == [5, 6, 7, 8] and all(new[s] == base_losses[s] for s in new), (base_losses, new)


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
