"""Evaluate a trained run folder on a shard split, clean and under noise (launch/evaluate.py's library).

Every process loads the whole trained model from the run folder (trainer/run_folder/load.py: no
DeepSpeed engine, any ZeRO stage and world size of the training run) and decodes its share of the
split; `evaluate_wer` keeps the ranks in step and gathers the hypotheses. Noise conditions add white or
babble noise to the audio at a signal-to-noise ratio before its log-mel features (trainer/data/decode.py),
to every clip; babble is a sum of `babble_speakers` other clips of the same split.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.data.config import DataConfig
from trainer.data.skips import skip_summary
from trainer.engine.evaluate import evaluate_wer

log = logging.getLogger(__name__)

CLEAN = "clean"
NOISES = ("babble", "white")


@dataclass(frozen=True)
class Condition:
    snr_db: float | None
    """None = clean audio."""

    @property
    def name(self) -> str:
        return CLEAN if self.snr_db is None else f"{self.snr_db:g}dB"


def parse_conditions(values: list[str] | None) -> list[Condition]:
    """['clean', '10', '5', '0', '-5'] -> conditions in that order; none given -> clean only."""
    if not values:
        return [Condition(None)]
    out = []
    for v in values:
        if v.lower() == CLEAN:
            out.append(Condition(None))
            continue
        try:
            snr = float(v.lower().removesuffix("db"))
        except ValueError:
            raise ValueError(f"--snr: {v!r} is neither 'clean' nor a number of dB") from None
        if not math.isfinite(snr):
            raise ValueError(f"--snr: {v!r} is not a finite number of dB")
        out.append(Condition(snr))
    if len({c.name for c in out}) != len(out):
        raise ValueError(f"--snr: repeated condition in {values}")
    return out


def condition_data(data: DataConfig, condition: Condition, noise: str) -> DataConfig:
    """The data config of one condition: every clip mixed at its SNR, or no noise at all."""
    if condition.snr_db is None:
        return dataclasses.replace(data, noise="none", noise_in_eval=False)
    return dataclasses.replace(data, noise=noise, snr_db=condition.snr_db, noise_prob=1.0, noise_in_eval=True)


@dataclass
class EvalRequest:
    run_dir: Path
    out_dir: Path
    """Where rank 0 writes results.json, table.txt and utterances_<condition>.json."""
    checkpoint: str = "latest"
    shards: str | None = None
    """Shard folder (None = the run's data.shard_dir)."""
    split: str = "test"
    beams: int | None = None
    """None = the run's train.eval_beams."""
    max_new_tokens: int | None = None
    """None = the run's train.eval_max_new_tokens."""
    max_samples: int | None = None
    conditions: tuple[Condition, ...] = (Condition(None),)
    noise: str = "babble"
    workers: int | None = None
    """DataLoader workers per process (None = the run's data.num_workers)."""

    def __post_init__(self):
        if self.noise not in NOISES:
            raise ValueError(f"--noise must be one of {NOISES}, got {self.noise!r}")
        for name in ("beams", "max_new_tokens", "max_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")


def shard_location(shard_dir: str) -> str:
    from trainer.data.storage import is_remote, redact

    return redact(shard_dir) if is_remote(shard_dir) else str(Path(shard_dir).resolve())


def check_split(data: DataConfig, split: str) -> None:
    from trainer.data.shard_format import check_split as check

    check(data.shard_dir, split)


def check_request(req: EvalRequest):
    """The request's inputs, checked before any model or process group: the run folder is a run, the
    split has an index, the output folder can be written. Returns the run's config and the data config
    the evaluation reads; FileNotFoundError or ValueError (one line) otherwise."""
    from trainer.config_checks import folder_problem
    from trainer.run_folder.load import load_run_config

    try:
        cfg = load_run_config(req.run_dir)
    except (OSError, ValueError) as err:
        raise type(err)(f"--run-dir: {err}") from None
    data = dataclasses.replace(cfg.data, shard_dir=req.shards or cfg.data.shard_dir,
                               num_workers=cfg.data.num_workers if req.workers is None else req.workers)
    try:
        check_split(data, req.split)
    except (OSError, ValueError) as err:
        raise type(err)(f"--shards {data.shard_dir} / --split {req.split}: {err}") from None
    if any(c.snr_db is not None for c in req.conditions) and not cfg.model.uses_audio:
        raise ValueError(f"--snr: the run is {cfg.model.modality} (no audio): noise conditions need audio")
    if req.checkpoint not in ("latest", "export") and not Path(req.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {req.checkpoint}: no such file or folder (or: latest, export)")
    problem = folder_problem("--out", req.out_dir)
    if problem:
        raise ValueError(problem)
    return cfg, data


def evaluate_run(req: EvalRequest, *, rank: int, world_size: int, device: torch.device) -> dict:
    """Every rank calls this; rank 0 writes the files and returns the full results (others: theirs)."""
    from trainer.data.pipeline import build_eval_loader
    from trainer.run_folder.load import load_run_config, load_trained_model
    from trainer.model.avsr import batch_to_device, build_tokenizer

    cfg, data = check_request(req)                     # fails early, before the model is built
    model, cfg, src = load_trained_model(req.run_dir, req.checkpoint, device)
    tokenizer = build_tokenizer(cfg.model)
    beams = req.beams or cfg.eval_beams
    max_new_tokens = req.max_new_tokens or cfg.eval_max_new_tokens

    def to_device(batch: dict) -> dict:
        return batch_to_device(batch, device)

    results = {"run_dir": str(req.run_dir), "weights": src.describe(), "step": src.step,
               "shards": shard_location(data.shard_dir), "split": req.split, "modality": cfg.model.modality,
               "beams": beams, "max_new_tokens": max_new_tokens, "max_samples": req.max_samples,
               "noise": req.noise if any(c.snr_db is not None for c in req.conditions) else None,
               "world_size": world_size, "conditions": {}}
    for condition in req.conditions:
        loader = build_eval_loader(condition_data(data, condition, req.noise), model.input_streams, req.split,
                                   rank=rank, world_size=world_size)
        results["conditions"][condition.name] = evaluate_wer(
            model, loader, tokenizer=tokenizer, device=device, to_device=to_device, num_beams=beams, max_new_tokens=max_new_tokens,
            synced_gpus=False, max_samples=req.max_samples, rank=rank, desc=f"{req.split} {condition.name}",
            report_path=req.out_dir / f"utterances_{condition.name}.json")
    if rank == 0:
        req.out_dir.mkdir(parents=True, exist_ok=True)
        (req.out_dir / "results.json").write_text(json.dumps(results, indent=2))
        (req.out_dir / "table.txt").write_text(format_table(results))
    return results


def format_table(results: dict) -> str:
    """The printed and saved summary: one row per condition."""
    noise = f", {results['noise']} noise" if results["noise"] else ""
    lines = [f"{results['modality']} on {results['split']} ({results['shards']}{noise}); {results['weights']}; "
             f"beams {results['beams']}",
             f"{'condition':>10}  {'WER %':>7}  {'CER %':>7}  {'utterances':>10}"]
    for name, r in results["conditions"].items():
        lines.append(f"{name:>10}  {100 * r['wer']:7.2f}  {100 * r['cer']:7.2f}  {int(r['num_utterances']):10d}")
    for name, r in results["conditions"].items():      # bad clips the loader dropped, all ranks
        skipped = skip_summary({k.split("/", 1)[1]: int(v) for k, v in r.items() if k.startswith("skipped/")})
        if skipped:
            lines.append(f"{name}: {skipped}")
    return "\n".join(lines) + "\n"


def log_to_mlflow(run_dir: Path, results: dict, out_dir: Path) -> str:
    """Metrics `evaluate/<split>/<condition>/<modality>/{wer,cer,...}` at the weights' step, and the
    output folder as artefacts `evaluate/<folder name>`, in the run's own MLflow run. Returns the run id."""
    from trainer.tracking.tracker import MLflowTracker

    tracker = MLflowTracker.attach(run_dir)
    split, mod = results["split"], results["modality"]
    metrics = {f"evaluate/{split}/{cond}/{mod}/{k}": v
               for cond, r in results["conditions"].items() for k, v in r.items()}
    tracker.log_metrics(metrics, results["step"] or 0)
    tracker.log_artifact(out_dir, f"evaluate/{out_dir.name}")
    if not tracker.detach():
        log.warning("MLflow: not all evaluation results were delivered; `python launch/replay_tracking.py "
                    "--run-dir %s` delivers them", run_dir)
    return tracker.run_id
