"""Resume on another world size, with real processes (torchrun, gloo, the tiny model on CPU).

From the session's runs of 6 steps with checkpoints at step 3 (tests/helpers.py RUNS): ZeRO-3 in both
directions (2 ranks -> 1, 1 -> 2) and ZeRO-2 from 2 ranks to 1. A copy of the run folder is resumed from
step 3 on the other number of ranks by tests/support/world_size_probe.py, which writes the state it
loaded (gathered again on that world size) before training on. The master weights, both Adam moments,
Adam's step, the lr, the schedule and the engine's counters must equal the checkpoint's bit for bit, and
the losses of steps 4-6 stay close to the uninterrupted run's (the data stream is repartitioned, so they
are not equal: their mean is compared). Also: a checkpoint without its portable copy, resumed on another
world size, is one line naming both world sizes and the way out, before any process group starts.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.constants import REPO
from tests.helpers import TRAIN, command, printed_losses, run, train_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
PROBE = REPO / "tests" / "support" / "world_size_probe.py"
# what the resumed runs leave out after training (they do not change the training itself)
NOTHING_AFTER = ("--train.final-eval-splits", "--train.export-on-finish", "False", "--monitor.every", "0",
                 "--tracking.enabled", "False")


@pytest.mark.parametrize("stage,saved,resumed", [(3, 2, 1), (3, 1, 2), (2, 2, 1)])
def test_resume_on_another_world_size_carries_the_state_exactly(trained_run, synth_corpus, tmp_path, stage, saved,
                                                                resumed):
    base = trained_run({(3, 2): "zero3_2proc", (3, 1): "zero3_1proc", (2, 2): "zero2_2proc"}[stage, saved])
    assert base.spec.nproc == saved and base.spec.config == f"zero{stage}.json"
    base_losses = {s: float(v) for s, v in printed_losses(base.output).items()}
    folder = base.copy(tmp_path / "run")
    step3 = folder / "checkpoints" / "step_00000003"
    assert json.loads((step3 / "MANIFEST.json").read_text())["world_size"] == saved
    assert "portable/state.safetensors" in json.loads((step3 / "MANIFEST.json").read_text())["files"]
    dump = tmp_path / "dump"
    args = train_args(folder, synth_corpus, *base.spec.args, *NOTHING_AFTER, "--train.resume", str(step3),
                      config=base.spec.config)
    p = run(command(PROBE, "--dump", str(dump), "--", *args, launcher="torchrun", nproc=resumed), env=base.env())
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
    new = {s: float(v) for s, v in printed_losses(out).items()}
    assert sorted(new) == [4, 5, 6], new
    # Other batches, the same model and schedule: per step the tiny model's loss swings by 15 % with the
    # batch, so the mean of steps 4-6 is compared; it stays below where training started.
    mean = sum(new.values()) / 3
    base_mean = sum(base_losses[s] for s in (4, 5, 6)) / 3
    assert abs(mean - base_mean) < 0.15 * base_mean, (sorted(base_losses.items()), new)
    assert mean < sum(base_losses[s] for s in (1, 2, 3)) / 3, (sorted(base_losses.items()), new)


def test_a_checkpoint_without_its_portable_copy_is_one_line_before_any_process_group(trained_run, synth_corpus,
                                                                                     tmp_path):
    base = trained_run("zero3_2proc")
    folder = base.copy(tmp_path / "run")
    for step in (folder / "checkpoints").glob("step_*"):     # as written before portable copies existed
        shutil.rmtree(step / "portable")
        manifest = json.loads((step / "MANIFEST.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("portable/")}
        (step / "MANIFEST.json").write_text(json.dumps(manifest))
    # one process without a launcher (torchrun adds its own ChildFailedError report to any failed rank)
    args = train_args(folder, synth_corpus, *base.spec.args, *NOTHING_AFTER, "--train.max-steps", "8")
    p = run(command(TRAIN, *args), env=base.env(), ok=False)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "written by 2 ranks" in errors[0] and "this run has 1" in errors[0] and "resume it on 2 ranks" in errors[0]
    assert "Initializing TorchBackend" not in p.stdout + p.stderr          # deepspeed.init_distributed's line
