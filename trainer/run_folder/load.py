"""A trained Llama-AVSR back from its run folder, in one process, without DeepSpeed's engine.

The architecture comes from the run's `experiment.json` (its tokenizer from `run_dir/tokenizer`),
the weights from one of (`checkpoint`):

    "latest"   the newest checkpoint in run_dir/checkpoints that verifies, any ZeRO stage and world
               size: DeepSpeed's zero_to_fp32 rebuilds every weight (frozen ones included) on CPU
    "export"   run_dir/export/model.safetensors, the consolidated model written at the end of training
    a path     a checkpoint folder (step_XXXXXXXX), a checkpoints/ folder (its newest that verifies), a
               full state dict (.safetensors as export/model.safetensors, or a .pt loaded with
               weights_only=True), or trainable weights only (export/trainable.safetensors)

Checkpoints are verified first (trainer/engine/checkpoint.py: sizes, SHA-256, pickles loadable with
weights_only=True) because DeepSpeed's zero_to_fp32 unpickles them without that restriction.

The frozen weights are taken from the checkpoint, not rebuilt from the seed: the tiny stand-ins
(random Llama, Whisper, AV-HuBERT) are initialised under zero.Init in training, which does not
draw the values a plain build draws from the same seed. So trainable-only weights are accepted
only when the rebuilt frozen base matches the frozen-weight fingerprint recorded in the run's
checkpoints (every frozen part read from pretrained folders).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.data.config import DataConfig
from trainer.engine.checkpoint import LATEST, MANIFEST, newest_verified, verify
from trainer.engine.config import TrainConfig
from trainer.engine.export import CONSOLIDATED, KIND_KEY
from trainer.config_checks import build_config, one_line
from trainer.model.config import ModelConfig
from trainer.monitor.config import MonitorConfig

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """The parts of a run's saved config needed to rebuild and probe its model."""

    run_dir: Path
    model: ModelConfig
    data: DataConfig
    monitor: MonitorConfig
    seed: int
    """The run's train.seed."""
    eval_beams: int
    """The run's evaluation beam width (train.eval_beams)."""
    eval_max_new_tokens: int
    """The run's longest generated transcript (train.eval_max_new_tokens)."""


@dataclass
class WeightsSource:
    kind: str
    """"checkpoint" (DeepSpeed folder), "consolidated" (full state dict file) or "trainable"."""
    path: Path
    step: int | None
    """Optimizer step of the weights, when known."""
    fingerprint: list[float] | None
    """The run's frozen-weight fingerprint (trainer_state.json), when a checkpoint records it."""

    def describe(self) -> str:
        at = f" (step {self.step})" if self.step is not None else ""
        return f"{self.kind} {self.path}{at}"


def load_run_config(run_dir: str | Path) -> RunConfig:
    """Model, data and monitor configs from `run_dir/experiment.json` (written at the start of a run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    path = run_dir / "experiment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no experiment.json "
                                f"(written by launch/train.py)")
    try:
        raw = json.loads(path.read_text())
        raw["model"], raw["data"]          # noqa: B018 (both sections are needed below)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is cut short or not a run's experiment.json ({type(err).__name__}: {err}); "
                         f"{run_dir} is not a run folder of launch/train.py") from None
    try:
        return _run_config(run_dir, path, raw)
    except (TypeError, ValueError) as err:       # options this code does not take: another trainer's run
        raise ValueError(f"{path} does not match this trainer's options ({one_line(err)}); read the run "
                         f"with the checkout that trained it") from None


def _run_config(run_dir: Path, path: Path, raw: dict) -> RunConfig:
    model = build_config(ModelConfig, raw["model"], f"{path} model", "model")
    # The tokenizer the trainer trained lives in the run folder: follow the folder if it moved.
    train = raw.get("train", {})        # read for a few values only: the rest is the training's business
    saved_run_dir = train.get("run_dir")
    saved_tokenizer = Path(saved_run_dir) / "tokenizer" if saved_run_dir else None
    if model.tokenizer_path and Path(model.tokenizer_path) == saved_tokenizer:
        model.tokenizer_path = str(run_dir / "tokenizer")
    data = dict(raw["data"])
    if str(data.get("shard_dir", "")).startswith("pipe:"):
        # a run folder may come from someone else: its files never choose a command to run here
        logging.getLogger(__name__).warning(
            "%s names a pipe: shard location; not running it (pass the shard location yourself)", path)
        data["shard_dir"] = ""
    return RunConfig(run_dir=run_dir, model=model, data=build_config(DataConfig, data, f"{path} data", "data"),
                     monitor=build_config(MonitorConfig, raw.get("monitor", {}), f"{path} monitor", "monitor"),
                     **{name: int(train.get(name, getattr(TrainConfig, name)))
                        for name in ("seed", "eval_beams", "eval_max_new_tokens")})


def _checkpoint_folder(path: Path) -> Path | None:
    """A checkpoint folder at `path` that verifies, or the newest such one of a checkpoints/ folder;
    None when there is none; ValueError naming the problems when there are only broken ones."""
    if (path / LATEST).is_file() or any(path.glob("step_*")):
        chosen, rejected = newest_verified(path)
        for folder, problems in rejected:
            log.warning("checkpoint %s rejected: %s", folder, "; ".join(problems))
        if chosen is None and rejected:
            raise ValueError(f"no checkpoint in {path} verifies: " + "; ".join(
                f"{f.name}: {', '.join(p)}" for f, p in rejected))
        return chosen
    if (path / MANIFEST).is_file():
        problems = verify(path)
        if problems:
            raise ValueError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
        return path
    return None


def _trainer_state(folder: Path | None) -> dict:
    path = folder / "trainer_state.json" if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def resolve_weights(run_dir: str | Path, checkpoint: str = "latest") -> WeightsSource:
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    # the run's fingerprint: any completed checkpoint records the same one (a JSON file, safe to read)
    sealed = sorted(ckpt_root.glob(f"step_*/{MANIFEST}")) if ckpt_root.is_dir() else []
    fingerprint = _trainer_state(sealed[-1].parent if sealed else None).get("frozen_fingerprint")
    if checkpoint == "latest":
        latest = _checkpoint_folder(ckpt_root) if ckpt_root.is_dir() else None
        if latest is None:
            has_export = (run_dir / "export" / CONSOLIDATED).is_file()
            hint = " (there is an export: use --checkpoint export)" if has_export else ""
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_root}{hint}")
        return WeightsSource("checkpoint", latest, _trainer_state(latest).get("step"), fingerprint)
    if checkpoint == "export":
        path = run_dir / "export" / CONSOLIDATED
        if not path.is_file():
            raise FileNotFoundError(f"no consolidated export at {path} (written when training finishes)")
        results = run_dir / "results.json"
        step = json.loads(results.read_text()).get("step") if results.is_file() else None
        return WeightsSource("consolidated", path, step, fingerprint)
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        folder = _checkpoint_folder(path)
        if folder is None:
            raise FileNotFoundError(f"{path} is neither a DeepSpeed checkpoint folder (step_XXXXXXXX) nor a "
                                    f"checkpoints/ folder with a 'latest' file")
        state = _trainer_state(folder)
        return WeightsSource("checkpoint", folder, state.get("step"),
                             state.get("frozen_fingerprint") or fingerprint)
    kind = "consolidated"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            written_as = (f.metadata() or {}).get(KIND_KEY)
        kind = written_as or ("consolidated" if path.name == CONSOLIDATED else "trainable")
    return WeightsSource(kind, path, None, fingerprint)


def read_state_dict(src: WeightsSource) -> dict[str, torch.Tensor]:
    """All weights of a DeepSpeed checkpoint (fp32 master weights + frozen ones + buffers), or a file's.
    A checkpoint folder has verified (resolve_weights) before zero_to_fp32 unpickles it."""
    if src.kind == "checkpoint":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        quiet = io.StringIO()     # zero_to_fp32 prints its progress
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(src.path.parent), tag=src.path.name)
    elif src.path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(src.path))
    else:
        state = torch.load(src.path, map_location="cpu", weights_only=True)
    return {k: v.detach() for k, v in state.items()}


def load_trained_model(run_dir: str | Path, checkpoint: str = "latest", device: str | torch.device = "cpu"):
    """-> (model in eval mode on `device`, RunConfig, WeightsSource)."""
    from trainer.engine.checkpoint import frozen_weight_sums, seed_everything
    from trainer.model import build_model
    from trainer.model.loading import load_state_dict_exact

    cfg = load_run_config(run_dir)
    src = resolve_weights(run_dir, checkpoint)
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    state = read_state_dict(src)
    if src.kind == "trainable":
        trainable = set(model.trainable_parameter_names()) | {"delimiter_embeddings.weight"}   # written frozen too
        missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
        if missing or unexpected:
            raise KeyError(f"{src.path} does not hold this run's trainable weights: missing {missing[:10]}, "
                           f"unexpected {unexpected[:10]}")
        model.load_state_dict(state, strict=False)
    else:
        load_state_dict_exact(model, state, what=str(src.path))
    if src.fingerprint:
        ours = frozen_weight_sums(model).tolist()
        if not np.allclose(src.fingerprint, ours, rtol=1e-6):
            msg = (f"the frozen weights differ from those the run trained with (fingerprint {ours} vs "
                   f"{src.fingerprint})")
            if src.kind == "trainable":
                raise ValueError(f"{msg}: trainable-only weights need the run's exact frozen base, which a "
                                   f"randomly initialised (tiny) part does not reproduce; load a checkpoint "
                                   f"(--checkpoint latest) or the consolidated export (--checkpoint export)")
            log.warning("%s; a 16-bit export rounds them, otherwise check the pretrained paths", msg)
    return model.to(device).eval(), cfg, src
