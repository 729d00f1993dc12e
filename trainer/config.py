"""The experiment config: one typed tree, from defaults, a recipe file and the command line.

    deepspeed launch/train.py --config ds_configs/zero3.json \
        --recipe launch/recipes/lrs3_avsr.yaml --train.lr 1e-3 --model.modality asr

Precedence: command line > recipe (YAML with sections model/data/train/monitor/tracking)
> defaults (the CPU demo). Everything is validated here, before any process group starts.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from trainer.data.config import DataConfig
from trainer.engine.config import TrackingConfig, TrainConfig
from trainer.model.config import ModelConfig
from trainer.monitor.config import MonitorConfig

CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass
class ExperimentConfig:
    config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; its "auto" values are filled by the trainer."""
    recipe: Optional[str] = None
    """YAML recipe the other options were loaded from (informational; set with --recipe)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        path = Path(self.config)
        if not path.is_file() and not path.is_absolute() and (CHECKOUT / path).is_file():
            self.config = str(CHECKOUT / path)     # run from elsewhere: the checkout's ds_configs/
        elif not path.is_file():
            raise ValueError(f"--config {self.config}: no such DeepSpeed JSON (see ds_configs/)")
        # The data pipeline decodes only what the model consumes.
        if self.data.modality != self.model.modality:
            self.data = dataclasses.replace(self.data, modality=self.model.modality)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    """Dataclass from a (possibly partial) dict, recursing into nested dataclasses; unknown keys are errors."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING \
            else None
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value) if isinstance(default, tuple) else value
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_recipe(path: str | Path, **overrides: Any) -> ExperimentConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path} must be a mapping of sections (model, data, train, ...)")
    raw.update(overrides)
    raw["recipe"] = str(path)
    return _build(ExperimentConfig, raw, f"recipe {path}")


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    """Parse the command line (the deepspeed launcher's --local_rank is dropped: LOCAL_RANK is in the env)."""
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    default = ExperimentConfig()
    if "--recipe" in args:
        i = args.index("--recipe")
        if i + 1 >= len(args):
            raise SystemExit("--recipe needs a path")
        default = load_recipe(args[i + 1])
        del args[i:i + 2]
    return tyro.cli(ExperimentConfig, default=default, args=args,
                    description="Train Llama-AVSR with DeepSpeed (see README.md).",
                    config=(tyro.conf.FlagConversionOff,))
