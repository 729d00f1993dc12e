"""Verified, atomic, resumable DeepSpeed checkpoints.

Layout under `{run_dir}/checkpoints/`:
    step_00000200/            DeepSpeed's files (model, ZeRO partitions, optimizer, scheduler)
        rng_rank{r}.pt        each rank's RNG and data-stream position (tensors and numbers only)
        trainer_state.json    step, frozen-weight fingerprint, world size, MLflow run id
        MANIFEST.json         written last, atomically: every other file with its size and SHA-256.
                              A folder without it is an interrupted save.
    latest                    the tag of the newest checkpoint that verified, replaced atomically
    set_aside/<time>-<why>/   checkpoints moved out of the way (rejected, or newer than the one a
                              user resumed from), never deleted by the trainer; WHY.txt says why

A checkpoint is used only after it verifies (`verify`): the manifest is there, every file it
lists has its size and checksum, and every pickle in it loads with `weights_only=True` under
the small allowlist below (DeepSpeed's loaders hard-code `weights_only=False`: its checkpoint
engine is switched to `weights_only=True` for resume, and zero_to_fp32, used offline, reads only
files that passed this check). Resume takes the newest checkpoint that verifies
and sets the others aside, saying why. DeepSpeed's own `latest` file is not used: it is written
before we know every rank finished.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.data.stream import repartition
from trainer.engine import portable

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
SET_ASIDE = "set_aside"
HASH = "sha256"
_CHUNK = 8 << 20


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


# ---- checksums and the manifest ------------------------------------------------------------------
def file_digest(path: Path, durable: bool = False) -> str:
    """SHA-256 of a file, read in 8 MiB chunks (hashlib releases the GIL). durable: fsync it first,
    so the manifest never vouches for bytes still only in the page cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if durable:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.endswith(".tmp"))


def write_manifest(folder: Path, step: int, entries: dict[str, dict], world_size: int) -> None:
    body = {"version": 1, "tag": folder.name, "step": step, "world_size": world_size, "hash": HASH,
            "files": dict(sorted(entries.items()))}
    _atomic_write(folder / MANIFEST, json.dumps(body, indent=1) + "\n")


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"no {MANIFEST}: the save did not complete")
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("lists no file")
        return body
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{MANIFEST} unreadable ({err})") from err


def check_files(folder: Path, names: list[str], manifest: dict) -> list[str]:
    """Problems with the named files (size, checksum, unsafe pickle); empty when all are good."""
    problems = []
    for name in names:
        want = manifest["files"][name]
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {want['size']}")
            continue
        if file_digest(path) != want[HASH]:
            problems.append(f"{name}: {HASH} differs from the manifest (file corrupted)")
            continue
        if name.endswith(".pt"):
            problem = unsafe_pickle(path)
            if problem:
                problems.append(f"{name}: {problem}")
    return problems


def verify(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Why `folder` is not a usable checkpoint ([] = it is). Every rank checks a 1/world share of the
    files and the verdicts are gathered, so all ranks return the same list."""
    problems: list[str] = []
    manifest = None
    try:
        manifest = read_manifest(folder)
    except ValueError as err:
        problems.append(str(err))
    if manifest is not None:
        names = sorted(manifest["files"])
        # DeepSpeed finds its files by name pattern: a file the manifest does not vouch for is refused too
        problems += [f"{n}: not in the manifest" for n in list_files(folder) if n not in manifest["files"]]
        problems += check_files(folder, names[rank::world_size], manifest)
    if world_size > 1:
        problems = sorted(set(p for part in distributed.all_gather_object(problems) for p in part))
    return problems


# ---- pickles: refused unless they hold only tensors, plain data and a few DeepSpeed records --------
def _deepspeed_safe_globals() -> list:
    """Classes DeepSpeed's ZeRO checkpoints pickle besides tensors: enums and plain records whose
    construction runs no code of the file's choosing."""
    out: list = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        out.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        out.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        out += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return out


def safe_load(path: Path, **kwargs) -> Any:
    """torch.load with weights_only=True: tensors, containers, numbers, strings and the allowlist only."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


def weights_only_loads(checkpoint_engine) -> None:
    """Make a DeepSpeed checkpoint engine unpickle with weights_only=True.

    DeepSpeed's TorchCheckpointEngine.load hard-codes weights_only=False; load_checkpoint reads the
    model and optimizer states of a (non-universal) checkpoint through this one method, so replacing
    it on the instance makes DeepSpeed's own loads as strict as ours."""
    def load(path, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    checkpoint_engine.load = load


def unsafe_pickle(path: Path) -> str | None:
    """None if `path` loads with weights_only=True (memory-mapped: tensor data is not read), else why not."""
    try:
        safe_load(path, mmap=True)
    except Exception as err:      # noqa: BLE001 - any failure to load safely is a refusal
        first = " ".join(str(err).split())[:300]
        return f"refused: not loadable with weights_only=True ({type(err).__name__}: {first})"
    return None


# ---- the manager ----------------------------------------------------------------------------------
@dataclass
class ResumeState:
    step: int
    tag: str
    client_state: dict
    rank_state: dict          # this rank's data-stream position (and anything else per rank)
    trainer_state: dict


class CheckpointManager:
    def __init__(self, run_dir: str | Path, keep_last: int, rank: int, world_size: int, every: int = 0):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.every = every
        self.known_good: str | None = None     # a tag this process wrote or verified

    def should_run(self, step: int) -> bool:
        """A periodic save is due after `step` (every `every` steps; 0: only the final and stop saves)."""
        return self.every > 0 and step % self.every == 0

    def folders(self) -> list[Path]:
        """Every step_* folder, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step_*") if p.is_dir()), key=step_of, reverse=True)

    def complete(self) -> list[Path]:
        """Folders whose save completed (they have a manifest), newest first; not yet verified."""
        return [p for p in self.folders() if (p / MANIFEST).is_file()]

    def check_start(self, resume: str) -> None:
        """Refuse to start afresh in a run folder that already holds checkpoints.

        A fresh start there would skip saving every step the old run had saved ("already complete"),
        prune its own checkpoints in favour of the old ones and reattach to the old MLflow run: the
        old run would be corrupted and the new one unresumable. Called before anything is written."""
        complete = self.complete()
        if not complete or resume == "auto":
            return
        if resume != "never" and self._own(Path(resume)):
            return
        raise FileExistsError(
            f"{self.root.parent} already holds a run (checkpoints up to {complete[0].name}); --train.resume "
            f"{resume} would start a new run over it. Continue it with --train.resume auto, or give this run its "
            f"own --train.run-dir")

    def _own(self, path: Path) -> bool:
        own, target = self.root.resolve(), path.resolve()
        return target == own or own in target.parents

    def verify(self, folder: Path) -> list[str]:
        """Collective: every rank must call it."""
        return verify(folder, self.rank, self.world_size)

    # ---- saving ------------------------------------------------------------------------------------
    def save(self, ds_engine, step: int, client_state: dict, rank_state: dict, trainer_state: dict) -> Path:
        """Every rank must call this (ZeRO partitions are written by their owners). A write that fails on
        any rank (a full disk) raises SaveFailed on every rank, the unfinished folder set aside."""
        tag = tag_for(step)
        folder = self.root / tag
        if self.known_good == tag:
            return folder                            # written or verified by this process
        if folder.exists():
            problems = self.verify(folder)
            if not problems:
                log.info("checkpoint %s already complete and verified; not rewriting it", tag)
                self.known_good = tag
                self._point_latest(tag)
                return folder
            self._set_aside([(folder, problems)], "rejected-before-rewrite")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        room = self._room()
        failures: list[tuple[str, str, bool]] = []             # (file, error, disk full) per failed write
        record_write_failures(ds_engine.checkpoint_engine, failures)
        ds_engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        _attempt(failures, folder / portable.FOLDER,      # any world size resumes it
                 lambda: portable.save(ds_engine, folder, self.rank, rank_state.get("data")))
        rank_file = folder / f"rng_rank{self.rank}.pt"
        _attempt(failures, rank_file, lambda: torch.save(
            {"rng": capture_rng(), "rank_state": rank_state, "world_size": self.world_size}, rank_file))
        self._agree(failures, folder, step, room)               # every rank's files are on disk
        if self.rank == 0:
            _attempt(failures, folder / "trainer_state.json", lambda: (folder / "trainer_state.json").write_text(
                json.dumps({**trainer_state, "step": step}, indent=2)))
        self._agree(failures, folder, step, room)
        self._write_manifest(folder, step, failures)
        self._agree(failures, folder, step, room)
        if self.rank == 0:
            _attempt(failures, self.root / LATEST, lambda: self._point_latest(tag))
        self._agree(failures, folder, step, room)
        if self.rank == 0:
            self._prune(keep=tag)
            log.info("checkpoint %s written and its manifest (%s) sealed", folder, MANIFEST)
            self._warn_if_next_does_not_fit(folder)
        distributed.barrier()
        self.known_good = tag
        return folder

    def _write_manifest(self, folder: Path, step: int, failures: list) -> None:
        """Each rank fsyncs and hashes a share of the files; rank 0 writes the manifest last."""
        names = distributed.broadcast_object(list_files(folder) if self.rank == 0 else None, src=0)
        mine = {n: {"size": (folder / n).stat().st_size, HASH: file_digest(folder / n, durable=True)}
                for n in names[self.rank::self.world_size]}
        parts = distributed.all_gather_object(mine)
        if self.rank == 0:
            entries = {k: v for part in parts for k, v in part.items()}
            _attempt(failures, folder / MANIFEST, lambda: write_manifest(folder, step, entries, self.world_size))

    # ---- a full disk ---------------------------------------------------------------------------------
    def _room(self) -> tuple[int, int | None, Path | None]:
        """(bytes free under checkpoints/, bytes the save needs: the newest complete checkpoint's size, or
        None before the first, that checkpoint)."""
        previous = next(iter(self.complete()), None)
        need = None
        if previous is not None:
            try:
                need = sum(int(e["size"]) for e in read_manifest(previous)["files"].values())
            except ValueError:
                need = None
        return shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free, need, previous

    def _warn_if_next_does_not_fit(self, folder: Path) -> None:
        size = sum(int(e["size"]) for e in read_manifest(folder)["files"].values())
        free = shutil.disk_usage(self.root).free
        if free < size:
            log.warning("the next checkpoint will not fit: %s free under %s, a checkpoint takes %s; free space or "
                        "move the run folder to a disk with room (the same command resumes it there)",
                        _mb(free), self.root, _mb(size))

    def _agree(self, failures: list, folder: Path, step: int, room: tuple) -> None:
        """Collective, where a barrier would be: if a write failed on any rank, every rank sets the unfinished
        folder aside and raises SaveFailed with the same one line."""
        seen = [f for part in distributed.all_gather_object(failures) for f in part] if self.world_size > 1 \
            else failures
        if not seen:
            return
        path, what, full = next((f for f in seen if f[2]), seen[0])      # a full disk explains the rest
        aside = self._set_aside([(folder, [f"save interrupted: {path}: {what}"])], "save-failed")
        free, need, previous = room
        if full:
            needs = (f"the save needs about {_mb(need)} (the size of {previous.name})" if need
                     else "the first checkpoint's size was not known yet")
            head = f"disk full: checkpoint {folder.name} could not be written ({path}); {_mb(free)} were free " \
                   f"under {self.root} when the save began and {needs}"
        else:
            head = f"checkpoint {folder.name} could not be written ({path}: {what})"
        kept = (f"the previous checkpoint {previous.name} is intact and the same command resumes there once there "
                f"is room" if previous is not None else "no earlier checkpoint: the same command starts afresh")
        moved = aside is not None and (aside / folder.name).exists()
        where = f"; the unfinished folder was moved to {aside}" if moved else ""
        raise SaveFailed(f"{head}; {kept}{where}")

    def _point_latest(self, tag: str) -> None:
        if self.rank == 0:
            _atomic_write(self.root / LATEST, tag + "\n")

    def _prune(self, keep: str) -> None:
        for old in self.complete()[self.keep_last:]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def _set_aside(self, folders: list[tuple[Path, list[str]]], why: str) -> Path | None:
        """Rank 0 moves the folders to set_aside/<time>-<why>/ with a WHY.txt; collective (barrier). On a full
        disk the move (a rename) still works; a WHY.txt that cannot be written is only logged."""
        dest = None            # the barrier below is unconditional: ranks may see different lists
        if folders:
            dest = self.root / SET_ASIDE / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{why}"
            if self.rank == 0:
                lines = []
                try:
                    dest.mkdir(parents=True, exist_ok=True)
                    for folder, reasons in folders:
                        os.replace(folder, dest / folder.name)
                        lines.append(f"{folder.name}: " + ("; ".join(reasons) or why))
                        log.warning("moved %s to %s (%s); it is kept, not deleted", folder.name, dest,
                                    "; ".join(reasons) or why)
                    (dest / "WHY.txt").write_text("\n".join(lines) + "\n")
                except OSError as err:
                    log.warning("could not finish setting aside %s in %s (%s)", [f.name for f, _ in folders], dest, err)
        distributed.barrier()
        return dest

    # ---- choosing what to resume from --------------------------------------------------------------
    def resolve(self, resume: str) -> Path | None:
        """Collective. 'never' -> None; 'auto' -> the newest checkpoint of this run that verifies (None if
        there is none at all); a path -> that checkpoint, which must verify. Checkpoints that are rejected,
        or newer than the chosen one, are moved to set_aside/ (with the reason) so that the steps trained
        again are saved and never mixed with them."""
        if resume == "never":
            return None
        if resume != "auto" and Path(resume).resolve() == self.root.resolve():
            resume = "auto"                          # this run's own checkpoints/ folder
        if resume == "auto":
            chosen, rejected = self._newest_verified(self.folders())
            if chosen is None and rejected:
                raise RuntimeError(
                    f"no checkpoint in {self.root} verifies; nothing was moved or deleted:\n  " + "\n  ".join(
                        f"{f.name}: {'; '.join(p)}" for f, p in rejected))
            self._set_aside(rejected, f"rejected-resumed-from-{chosen.name}" if chosen else "rejected")
        else:
            path = Path(resume)
            if (path / LATEST).is_file() or path.name == "checkpoints":      # a checkpoints/ folder
                theirs = sorted(path.glob("step_*"), key=step_of, reverse=True)
                chosen, rejected = self._newest_verified(theirs)
                if chosen is None:
                    raise RuntimeError(f"--train.resume {resume}: no checkpoint there verifies: " + "; ".join(
                        f"{f.name}: {'; '.join(p)}" for f, p in rejected))
            else:
                chosen, problems = path, self.verify(path)
                if problems:
                    raise RuntimeError(f"--train.resume {resume} does not verify: {'; '.join(problems)}")
            if self._own(chosen):
                newer = [(f, [f"newer than {chosen.name}, which --train.resume asked for"])
                         for f in self.folders() if step_of(f) > step_of(chosen)]
                self._set_aside(newer, f"newer-than-{chosen.name}")
        if chosen is not None:
            self.known_good = chosen.name if self._own(chosen) else None
            if self._own(chosen):
                self._point_latest(chosen.name)
        return chosen

    def _newest_verified(self, folders: list[Path]) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
        rejected = []
        for folder in folders:
            problems = self.verify(folder)
            if not problems:
                return folder, rejected
            if self.rank == 0:
                log.warning("checkpoint %s rejected: %s", folder, "; ".join(problems))
            rejected.append((folder, problems))
        return None, rejected

    def load(self, ds_engine, folder: Path) -> ResumeState:
        """`folder` must have verified (resolve): its pickles were checked before DeepSpeed unpickles them,
        which it then does with weights_only=True too. Written by another world size: its portable/ copy
        is loaded instead of DeepSpeed's per-rank files (trainer/engine/portable.py)."""
        trainer_state = json.loads((folder / "trainer_state.json").read_text())
        saved_world = int(read_manifest(folder).get("world_size", self.world_size))
        if saved_world != self.world_size:
            return self._load_portable(ds_engine, folder, saved_world, trainer_state)
        weights_only_loads(ds_engine.checkpoint_engine)
        load_path, client_state = ds_engine.load_checkpoint(
            str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint at {folder}")
        rank_file, rank_state = folder / f"rng_rank{self.rank}.pt", {}
        if rank_file.is_file():
            saved = safe_load(rank_file)
            restore_rng(saved["rng"])
            rank_state = saved["rank_state"]
        return ResumeState(step=int(trainer_state["step"]), tag=folder.name, client_state=client_state or {},
                           rank_state=rank_state, trainer_state=trainer_state)

    def _load_portable(self, ds_engine, folder: Path, saved_world: int, trainer_state: dict) -> ResumeState:
        problem = world_size_problem(folder, saved_world, self.world_size)
        if problem:
            raise RuntimeError(problem)
        meta = portable.load(ds_engine, folder)
        data = repartition(meta["data"], saved_world, self.world_size) if meta.get("data") else None
        if self.rank == 0:
            log.warning("checkpoint %s was written by %d ranks, resuming on %d: model, optimizer state and lr "
                        "schedule loaded exactly from its portable/ copy; data stream repartitioned at global "
                        "micro-batch %d of epoch %s (now %s per rank); RNG streams are this world size's own",
                        folder.name, saved_world, self.world_size,
                        meta["data"]["position"] * saved_world if data else 0,
                        data["epoch"] if data else 0, data["position"] if data else 0)
        return ResumeState(step=int(trainer_state["step"]), tag=folder.name,
                           client_state={"step": int(trainer_state["step"])},
                           rank_state={"data": data} if data else {}, trainer_state=trainer_state)


def world_size_problem(folder: Path, saved_world: int, world_size: int) -> str | None:
    """One line when a checkpoint of `saved_world` ranks cannot be resumed on `world_size`, else None."""
    if saved_world == world_size or portable.present(folder):
        return None
    return (f"checkpoint {folder} was written by {saved_world} ranks and has no world-size-independent copy "
            f"({portable.FOLDER}/, written since this trainer resumes on other world sizes); this run has "
            f"{world_size}: resume it on {saved_world} ranks, or pass --train.resume never with a new "
            f"--train.run-dir to start afresh")


def resume_candidate(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a resume would most likely take (the newest with a manifest; not verified): what the
    checks before the process group starts look at."""
    if resume == "never":
        return None
    path = Path(run_dir) / "checkpoints" if resume == "auto" else Path(resume)
    if (path / MANIFEST).is_file():
        return path
    complete = sorted((p for p in path.glob("step_*") if (p / MANIFEST).is_file()), key=step_of, reverse=True)
    return complete[0] if complete else None


def check_world_size(run_dir: str | Path, resume: str, world_size: int) -> str | None:
    """Before any process group starts: why this run cannot resume its checkpoint on `world_size` ranks."""
    folder = resume_candidate(Path(run_dir), resume)
    if folder is None:
        return None
    try:
        saved = int(read_manifest(folder).get("world_size", world_size))
    except ValueError:
        return None          # resume itself names the damaged manifest and falls back
    return world_size_problem(folder, saved, world_size)


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; the message is the one line for the user. Every rank raises it."""


def record_write_failures(checkpoint_engine, failures: list) -> None:
    """Make a DeepSpeed checkpoint engine record a failed file write in `failures` instead of raising.

    DeepSpeed runs collectives after writing (its tag check, ZeRO-3's epilogue gather, a closing
    barrier): a rank that raised out of a write would leave the others waiting in them forever."""
    original = getattr(checkpoint_engine, "_raising_save", checkpoint_engine.save)
    checkpoint_engine._raising_save = original

    def save(state_dict, path):
        _attempt(failures, Path(path), lambda: original(state_dict, path))
    checkpoint_engine.save = save


def _attempt(failures: list, path: Path, write) -> None:
    try:
        write()
    except Exception as err:    # noqa: BLE001 - writers have their own types (torch: RuntimeError, safetensors)
        failures.append((str(path), _describe(err), _disk_full(err, path)))


def _disk_full(err: BaseException, path: Path) -> bool:
    """Said by the error, or (torch.save says only "unexpected pos 128 vs 0") by the room left right after it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(err).lower():
        return True
    try:
        return shutil.disk_usage(next(p for p in Path(path).parents if p.exists())).free < (1 << 20)
    except (OSError, StopIteration):
        return False


def _describe(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def newest_verified(root: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """One process: the newest checkpoint under a checkpoints/ folder that verifies, and the rejected ones."""
    rejected = []
    for folder in sorted((p for p in root.glob("step_*") if p.is_dir()), key=step_of, reverse=True):
        problems = verify(folder)
        if not problems:
            return folder, rejected
        rejected.append((folder, problems))
    return None, rejected


# ---- what a resume checks: the frozen base did not change ---------------------------------------------
def frozen_weight_sums(model: torch.nn.Module) -> torch.Tensor:
    """float64 [sum, sum of squares] of the frozen weights this process holds (its ZeRO-3 slices,
    or everything without ZeRO-3): the checkpoint's `frozen_fingerprint` once summed over ranks."""
    s = torch.zeros(2, dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad:
            continue
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        t = t.detach().double().cpu()
        s[0] += t.sum()
        s[1] += (t * t).sum()
    return s


# ---- RNG state as tensors and numbers (loadable with weights_only=True) ---------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
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
    fd = os.open(path.parent, os.O_RDONLY)      # the rename itself survives a crash
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
