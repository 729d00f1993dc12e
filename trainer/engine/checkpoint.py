"""Atomic, resumable DeepSpeed checkpoints.

Layout under `{run_dir}/checkpoints/`:
    step_00000200/            DeepSpeed's files (model, ZeRO partitions, optimizer, scheduler)
        rng_rank{r}.pt        each rank's RNG and data-stream position
        trainer_state.json    step, config digest, frozen-weight fingerprint
        COMPLETE              written last: a folder without it is ignored
    latest                    the tag of the newest complete checkpoint, replaced atomically

DeepSpeed's own `latest` file is not used: it is written before we know every rank
finished, so a crash could leave it pointing at a half-written folder.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class ResumeState:
    step: int
    tag: str
    client_state: dict
    rank_state: dict          # this rank's data-stream position (and anything else per rank)
    trainer_state: dict


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def check_start(self, resume: str) -> None:
        """Refuse to start afresh in a run folder that already holds checkpoints.

        A fresh start there would skip saving every step the old run had saved ("already complete"),
        prune its own checkpoints in favour of the old ones and reattach to the old MLflow run: the
        old run would be corrupted and the new one unresumable. Called before anything is written."""
        latest = self.latest_tag()
        if latest is None or resume == "auto":
            return
        if resume != "never":
            own = self.root.resolve()
            target = Path(resume).resolve()
            if target == own or own in target.parents:
                return                                   # one of this run's own checkpoints
        raise FileExistsError(
            f"{self.root.parent} already holds a run (checkpoints up to {latest}); --train.resume {resume} "
            f"would start a new run over it. Continue it with --train.resume auto, or give this run its "
            f"own --train.run-dir")

    # ---- saving ------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, rank_state: dict, trainer_state: dict) -> Path:
        """Every rank must call this (ZeRO partitions are written by their owners)."""
        tag = tag_for(step)
        folder = self.root / tag
        if self.latest_tag() == tag:
            log.info("checkpoint %s already complete; not rewriting it", tag)
            return folder
        if self.rank == 0 and folder.exists():      # debris of an interrupted save of this step
            shutil.rmtree(folder)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        torch.save({"rng": capture_rng(), "rank_state": rank_state, "world_size": self.world_size},
                   folder / f"rng_rank{self.rank}.pt")
        _barrier()                                   # every rank's files are on disk
        if self.rank == 0:
            (folder / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
            (folder / MARKER).write_text("ok\n")
            _atomic_write(self.root / LATEST, tag + "\n")
            self._prune(keep=tag)
            log.info("checkpoint %s written", folder)
        _barrier()
        return folder

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if (p / MARKER).is_file())
        for old in complete[:-self.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    # ---- loading -----------------------------------------------------------------------------------
    def latest_tag(self) -> str | None:
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if (self.root / tag / MARKER).is_file() else None

    def resolve(self, resume: str) -> Path | None:
        """'auto' -> newest complete checkpoint in the run folder (or None); 'never' -> None; else a path."""
        if resume == "never":
            return None
        if resume == "auto":
            tag = self.latest_tag()
            return self.root / tag if tag else None
        path = Path(resume)
        if (path / LATEST).is_file():                # a checkpoints/ folder was given
            path = path / (path / LATEST).read_text().strip()
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"--train.resume {resume}: {path} is not a complete checkpoint "
                                    f"(no {MARKER} marker)")
        return path

    def load(self, engine, folder: Path) -> ResumeState:
        load_path, client_state = engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {folder}")
        trainer_state = json.loads((folder / "trainer_state.json").read_text())
        rank_file = folder / f"rng_rank{self.rank}.pt"
        rank_state: dict = {}
        if rank_file.is_file():
            saved = torch.load(rank_file, weights_only=False)
            if saved.get("world_size") == self.world_size:
                restore_rng(saved["rng"])
                rank_state = saved["rank_state"]
            else:
                log.warning("checkpoint was written by %s ranks, resuming on %s: RNG and data position are "
                            "re-seeded, not restored", saved.get("world_size"), self.world_size)
        return ResumeState(step=int(trainer_state["step"]), tag=folder.name, client_state=client_state or {},
                           rank_state=rank_state, trainer_state=trainer_state)


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
