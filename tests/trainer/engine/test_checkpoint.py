"""trainer/engine/checkpoint.py in one process: what a save seals, what verification finds, which
checkpoint a resume takes and what it sets aside, when a save is due, and a bf16 ZeRO-3 engine's state
restored bit for bit.

The checkpoints are real: a DeepSpeed engine built here (the shipped ds_configs/zero3.json resolved as the
trainer resolves it, bf16 on DeepSpeed's CPU accelerator, a process group of this process alone) on a small
model with a frozen layer, saved by CheckpointManager.save as the trainer saves; each test damages a copy
with real file operations. Resume with real processes and the real model: tests/e2e/test_resume.py."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.constants import REPO
from tests.support.untrusted import RunsCode
from trainer.engine import portable
from trainer.engine.checkpoint import (LATEST, MANIFEST, CheckpointManager, file_digest, tag_for, verify)

DEEPSPEED_MODEL = "zero_pp_rank_0_mp_rank_00_model_states.pt"
DEEPSPEED_OPTIM = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
REFUSED = "refused: not loadable with weights_only=True"


def _engine(seed: int):
    """A ZeRO-3 bf16 engine with AdamW and the trainer's lr schedule over a model with a frozen layer."""
    import deepspeed

    from trainer.engine.ds_config import load_ds_config, resolve_ds_config
    from trainer.engine.schedule import warmup_cosine

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)              # frozen, as the LLM's base
    config = resolve_ds_config(load_ds_config(REPO / "ds_configs" / "zero3.json"), hidden_size=16,
                               micro_batch_size=4, grad_accum=1, grad_clip=1.0, lr=1e-2, weight_decay=0.01,
                               total_steps=10, warmup_steps=1, min_lr_ratio=0.1, bf16=True, on_cpu=True)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config,
        lr_scheduler=lambda opt: warmup_cosine(opt, warmup_steps=1, total_steps=10, min_lr_ratio=0.1))
    return engine


def _step(engine, i: int) -> float:
    """One optimizer step on batch i (the same inputs whatever the engine); returns the loss."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return loss.item()


def _save(engine, run_dir: Path, step: int) -> Path:
    manager = CheckpointManager(run_dir, keep_last=10, rank=0, world_size=1)
    return manager.save(engine, step, client_state={"step": step}, rank_state={"data": {"epoch": 0, "position": step}},
                        trainer_state={"frozen_fingerprint": [1.0, 2.0]})


@pytest.fixture(scope="module")
def saved(gloo_world_of_one, tmp_path_factory):
    """A run folder with checkpoints after steps 2, 3 and 4 of one engine."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    engine = _engine(seed=0)
    for i in range(4):
        _step(engine, i)
        if i + 1 >= 2:
            _save(engine, run_dir, i + 1)
    return run_dir


@pytest.fixture
def run_dir(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "run"))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def test_a_save_is_sealed_by_a_manifest_of_every_file(saved):
    ck = saved / "checkpoints"
    assert _steps(saved) == [tag_for(2), tag_for(3), tag_for(4)]
    assert (ck / LATEST).read_text().strip() == tag_for(4)
    for folder in ck.glob("step_*"):
        manifest = _manifest(folder)
        assert manifest["step"] == int(folder.name.split("_")[1]) and manifest["world_size"] == 1
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert sorted([*manifest["files"], MANIFEST]) == on_disk
        assert {DEEPSPEED_MODEL, DEEPSPEED_OPTIM, "rng_rank0.pt", "trainer_state.json", "portable/state.safetensors",
                "portable/state.json"} <= set(manifest["files"])
        for name, entry in manifest["files"].items():
            assert entry["size"] == (folder / name).stat().st_size > 0
            assert entry["sha256"] == file_digest(folder / name)
        assert verify(folder) == []


def _truncate(folder: Path) -> str:
    path = folder / DEEPSPEED_MODEL
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return f"{DEEPSPEED_MODEL}: {size // 2} bytes, the manifest says {size}"


def _flip_a_byte(folder: Path) -> str:
    with open(folder / DEEPSPEED_OPTIM, "r+b") as f:          # same size: only the checksum can tell
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    return f"{DEEPSPEED_OPTIM}: sha256 differs from the manifest (file corrupted)"


def _delete(folder: Path) -> str:
    (folder / "portable" / "state.safetensors").unlink()
    return "portable/state.safetensors: missing"


def _add_a_file(folder: Path) -> str:
    (folder / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"not from this save")
    return "zero_pp_rank_1_mp_rank_00_model_states.pt: not in the manifest"


def _unfinished(folder: Path) -> str:
    (folder / MANIFEST).unlink()                      # what a save interrupted before its last write leaves
    return f"no {MANIFEST}: the save did not complete"


def _unreadable_manifest(folder: Path) -> str:
    (folder / MANIFEST).write_text('{"files": ')
    return f"{MANIFEST} unreadable"


def _plant(folder: Path, name: str = "rng_rank0.pt") -> str:
    """A pickle that runs code when unpickled, its manifest entry forged to match (an attacker can)."""
    torch.save({"rng": RunsCode(folder.parent.parent.parent / "pwned")}, folder / name)
    manifest = _manifest(folder)
    manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return f"{name}: {REFUSED}"


def _plant_optimizer_state(folder: Path) -> str:
    return _plant(folder, DEEPSPEED_OPTIM)          # one DeepSpeed unpickles itself


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte, _delete, _add_a_file, _unfinished, _unreadable_manifest,
                                    _plant, _plant_optimizer_state], ids=lambda f: f.__name__.strip("_"))
def test_verification_names_the_damaged_file_and_why(run_dir, damage):
    folder = run_dir / "checkpoints" / tag_for(4)
    said = damage(folder)
    problems = verify(folder)
    assert len(problems) == 1 and problems[0].startswith(said), problems
    assert not (run_dir.parent / "pwned").exists()              # checking a pickle runs none of its code


def test_resume_takes_the_newest_checkpoint_that_verifies_and_sets_the_others_aside(run_dir, caplog):
    ck = run_dir / "checkpoints"
    truncated = _truncate(ck / tag_for(4))
    planted = _plant(ck / tag_for(3))
    manager = CheckpointManager(run_dir, keep_last=10, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        chosen = manager.resolve("auto")
    assert chosen == ck / tag_for(2) and (ck / LATEST).read_text().strip() == tag_for(2)
    assert not (run_dir.parent / "pwned").exists()
    said = caplog.text
    assert f"{tag_for(4)} rejected: {truncated}" in said and f"{tag_for(3)} rejected: {planted}" in said
    aside = list((ck / "set_aside").glob(f"*-rejected-resumed-from-{tag_for(2)}"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("step_*")) == [tag_for(3), tag_for(4)]
    why = (aside[0] / "WHY.txt").read_text()                 # kept, with the reasons, never deleted
    assert truncated in why and planted in why
    assert _steps(run_dir) == [tag_for(2)]


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside_as_they_were(run_dir):
    ck = run_dir / "checkpoints"
    newest = _manifest(ck / tag_for(4))
    chosen = CheckpointManager(run_dir, keep_last=10, rank=0, world_size=1).resolve(str(ck / tag_for(2)))
    assert chosen == ck / tag_for(2) and (ck / LATEST).read_text().strip() == tag_for(2)
    aside = list((ck / "set_aside").glob(f"*-newer-than-{tag_for(2)}"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("step_*")) == [tag_for(3), tag_for(4)]
    assert _manifest(aside[0] / tag_for(4)) == newest and verify(aside[0] / tag_for(4)) == []
    assert "which --train.resume asked for" in (aside[0] / "WHY.txt").read_text()


def test_when_no_checkpoint_verifies_resume_stops_and_moves_nothing(run_dir):
    ck = run_dir / "checkpoints"
    for step, damage in ((2, _delete), (3, _unfinished), (4, _truncate)):
        damage(ck / tag_for(step))
    with pytest.raises(RuntimeError, match="no checkpoint in .* verifies; nothing was moved or deleted"):
        CheckpointManager(run_dir, keep_last=10, rank=0, world_size=1).resolve("auto")
    assert _steps(run_dir) == [tag_for(2), tag_for(3), tag_for(4)] and not (ck / "set_aside").exists()


def test_a_bf16_zero3_engine_resumes_bit_for_bit(gloo_world_of_one, tmp_path):
    """The bf16 weights, the fp32 master weights, both Adam moments, Adam's step, the lr schedule and the
    RNG come back from a checkpoint: a fresh engine (another init) loaded from it takes the next steps
    with the uninterrupted engine's losses and ends with its state, bit for bit."""
    first = _engine(seed=0)
    for i in range(2):
        _step(first, i)
    folder = _save(first, tmp_path / "run", 2)
    rng = torch.get_rng_state()
    torch.manual_seed(1234)                                   # what the RNG restore must undo
    uninterrupted = [_step(first, i) for i in (2, 3)]
    portable.save(first, tmp_path / "first", 0, None)

    resumed = _engine(seed=7)
    state = CheckpointManager(tmp_path / "run", keep_last=10, rank=0, world_size=1).load(resumed, folder)
    assert state.step == 2 and state.rank_state == {"data": {"epoch": 0, "position": 2}}
    assert torch.equal(torch.get_rng_state(), rng)
    assert [p.dtype for p in resumed.module.parameters() if p.requires_grad] == [torch.bfloat16] * 3
    assert [_step(resumed, i) for i in (2, 3)] == uninterrupted
    portable.save(resumed, tmp_path / "resumed", 0, None)
    want = load_file(str(tmp_path / "first" / portable.FOLDER / portable.TENSORS))
    got = load_file(str(tmp_path / "resumed" / portable.FOLDER / portable.TENSORS))
    assert sorted(want) == sorted(got) and any(k.startswith("exp_avg_sq/") for k in want)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    meta = [json.loads((tmp_path / name / portable.FOLDER / portable.META).read_text())
            for name in ("first", "resumed")]
    assert meta[0]["adam_step"] == meta[1]["adam_step"] == 4
    assert meta[0]["lr_scheduler"] == meta[1]["lr_scheduler"] and meta[0]["param_groups"] == meta[1]["param_groups"]


def test_a_run_folder_with_checkpoints_is_continued_never_restarted(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, rank=0, world_size=1)
    for resume in ("auto", "never"):
        mgr.check_start(resume)                         # an empty run folder: anything goes
    done = mgr.root / "step_00000200"
    done.mkdir(parents=True)
    (done / MANIFEST).write_text("ok\n")
    (mgr.root / LATEST).write_text("step_00000200\n")
    mgr.check_start("auto")
    mgr.check_start(str(done))                          # one of its own checkpoints
    mgr.check_start(str(mgr.root))
    with pytest.raises(FileExistsError, match="already holds a run .*step_00000200.*--train.resume auto"):
        mgr.check_start("never")
    other = tmp_path / "other" / "checkpoints" / "step_00000100"
    other.mkdir(parents=True)
    (other / MANIFEST).write_text("ok\n")
    with pytest.raises(FileExistsError, match="own --train.run-dir"):
        mgr.check_start(str(other))                     # warm-starting from another run, into this one
    assert (done / MANIFEST).is_file()                  # nothing was touched


def test_checkpoints_decide_when_they_are_due(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, every=3)
    assert [s for s in range(1, 10) if ckpt.should_run(s)] == [3, 6, 9]
    assert not any(CheckpointManager(tmp_path, 2, 0, 1, every=0).should_run(s) for s in range(1, 10))
