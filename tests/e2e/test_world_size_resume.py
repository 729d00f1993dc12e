"""Resume on another world size, with real processes (torchrun, gloo, the tiny model on CPU).

Per ZeRO stage (3 and 2) and per direction (2 ranks -> 1, 1 -> 2): an uninterrupted run of 6 steps on N
ranks saving at step 3; a copy of its folder resumed from step 3 on M ranks by tests/support/world_size_probe.py,
which writes the state it loaded (gathered again on M ranks) before training on. The master weights, both
Adam moments, Adam's step, the lr, the schedule and the engine's counters must equal the checkpoint's
bit for bit, and the losses of steps 4-6 stay close to the uninterrupted run's (the data stream is
repartitioned, so they are not equal: their mean is compared). Also: a checkpoint without its portable
copy, resumed on another world size, is one line naming both world sizes and the way out, before any
process group starts.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.constants import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
STEPS = 6
ARGS = ["--data.num-workers", "1", "--data.max-frames-per-batch", "600", "--data.max-batch-size", "4",
        "--data.batches-per-epoch", "4", "--train.max-steps", str(STEPS), "--train.log-every", "1",
        "--train.warmup-steps", "1", "--train.lr", "3e-3", "--train.save-every", "3", "--train.final-eval", "False",
        "--train.eval-untrained", "False", "--train.export-on-finish", "False", "--monitor.every", "0",
        "--tracking.enabled", "False"]


def _run(nproc: int, script: list[str], stage: int, run_dir: Path, corpus: Path, *extra: str,
         ok: bool = True, launcher: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    train = ["--config", str(REPO / "ds_configs" / f"zero{stage}.json"), "--data.shard-dir", str(corpus),
             "--train.run-dir", str(run_dir), *ARGS, *extra]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                             if launcher else []), *script, *train]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if ok:
        assert p.returncode == 0, f"failed:\n{(p.stdout + p.stderr)[-6000:]}"
    return p


def _losses(out: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+)/\d+ loss (\S+)", out)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth_corpus):
    """(stage, ranks) -> (run folder, its losses); trained once each, on first use."""
    root, done = tmp_path_factory.mktemp("world"), {}

    def get(stage: int, nproc: int):
        if (stage, nproc) not in done:
            run = root / f"zero{stage}_n{nproc}"
            p = _run(nproc, [str(REPO / "launch" / "train.py")], stage, run, synth_corpus)
            done[stage, nproc] = run, _losses(p.stdout + p.stderr)
        return done[stage, nproc]
    return get


@pytest.mark.parametrize("stage", [3, 2])
@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_carries_the_state_exactly(uninterrupted, synth_corpus, tmp_path, stage,
                                                                saved, resumed):
    base, base_losses = uninterrupted(stage, saved)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    step3 = run / "checkpoints" / "step_00000003"
    assert json.loads((step3 / "MANIFEST.json").read_text())["world_size"] == saved
    assert "portable/state.safetensors" in json.loads((step3 / "MANIFEST.json").read_text())["files"]
    dump = tmp_path / "dump"
    p = _run(resumed, [str(REPO / "tests" / "support" / "world_size_probe.py"), "--dump", str(dump), "--"], stage, run,
             synth_corpus, "--train.resume", str(step3))
    out = p.stdout + p.stderr
    assert f"was written by {saved} ranks, resuming on {resumed}" in out, out[-4000:]
    want = load_file(str(step3 / "portable" / "state.safetensors"))
    got = load_file(str(dump / "portable" / "state.safetensors"))
    assert sorted(want) == sorted(got)
    assert any(k.startswith("exp_avg_sq/") for k in want) and any(k.startswith("param/") for k in want)
    unequal = [k for k in want if not torch.equal(want[k], got[k])]
    assert not unequal, unequal[:5]
    m_want = json.loads((step3 / "portable" / "state.json").read_text())
    m_got = json.loads((dump / "portable" / "state.json").read_text())
    assert m_got["adam_step"] == m_want["adam_step"] == 3
    assert m_got["param_groups"] == m_want["param_groups"]          # lr included
    assert m_got["lr_scheduler"] == m_want["lr_scheduler"] and m_got["engine"] == m_want["engine"]
    # the data position: the same global micro-batch of the epoch (4 per rank per epoch here)
    assert m_got["data"] == {"epoch": 0, "position": 3 * saved // resumed}
    new = _losses(out)
    assert sorted(new) == [4, 5, 6], new
    # Other batches, the same model and schedule: per step the tiny model's loss swings by 15 % with the
    # batch, so the mean of steps 4-6 is compared; it stays below where training started.
    mean = sum(new.values()) / 3
    base_mean = sum(base_losses[s] for s in (4, 5, 6)) / 3
    assert abs(mean - base_mean) < 0.15 * base_mean, (sorted(base_losses.items()), new)
    assert mean < sum(base_losses[s] for s in (1, 2, 3)) / 3, (sorted(base_losses.items()), new)

def test_a_checkpoint_without_its_portable_copy_is_one_line_before_any_process_group(uninterrupted, synth_corpus,
                                                                                     tmp_path):
    base, _ = uninterrupted(3, 2)
    run = tmp_path / "run"
    shutil.copytree(base, run)
    for folder in (run / "checkpoints").glob("step_*"):     # as written before portable copies existed
        shutil.rmtree(folder / "portable")
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("portable/")}
        (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    # one process without a launcher (torchrun adds its own ChildFailedError report to any failed rank)
    p = _run(1, [str(REPO / "launch" / "train.py")], 3, run, synth_corpus, "--train.max-steps", "8", ok=False,
             launcher=False)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "written by 2 ranks" in errors[0] and "this run has 1" in errors[0] and "resume it on 2 ranks" in errors[0]
    assert "Initializing TorchBackend" not in p.stdout + p.stderr          # deepspeed.init_distributed's line
