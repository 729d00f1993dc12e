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


def build_config(cls, values: dict, where: str):
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
            kwargs[name] = build_config(type(default), value, f"{where}.{name}")
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
    return build_config(ExperimentConfig, raw, f"recipe {path}")


class ConfigError(ValueError):
    """A bad option, recipe or input path, found before any process group starts (one line for the user)."""


def parse_args(argv: Sequence[str] | None = None, check: bool = True) -> ExperimentConfig:
    """Parse the command line (the deepspeed launcher's --local_rank is dropped: LOCAL_RANK is in the env).

    check: also check the inputs the run will read (`check_inputs`); ConfigError on any problem."""
    import tyro

    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    default = ExperimentConfig()
    if "--recipe" in args:
        i = args.index("--recipe")
        if i + 1 >= len(args):
            raise SystemExit("--recipe needs a path")
        try:
            default = load_recipe(args[i + 1])
        except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
            raise ConfigError(f"recipe {args[i + 1]}: {_one_line(err)}") from err
        del args[i:i + 2]
    cfg = tyro.cli(ExperimentConfig, default=default, args=args,
                   description="Train Llama-AVSR with DeepSpeed (see README.md).",
                   config=(tyro.conf.FlagConversionOff,))
    if check:
        problems = check_inputs(cfg)
        if problems:
            raise ConfigError("; ".join(problems))
    return cfg


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def check_inputs(cfg: ExperimentConfig) -> list[str]:
    """What the run will read, checked on the file system before any process starts training: the
    DeepSpeed JSON parses, pretrained paths hold what they should, the shard set has its indexes.
    Returns the problems (empty: all well)."""
    from trainer.data.shard_format import index_location, index_path
    from trainer.data.storage import exists, is_remote, redact
    from trainer.data.config import DEMO_SHARD_DIR
    from trainer.engine.ds_config import DeepSpeedConfigError, load_ds_config

    problems: list[str] = []
    try:
        if not isinstance(load_ds_config(cfg.config), dict):
            problems.append(f"DeepSpeed config {cfg.config} must be a JSON object")
    except DeepSpeedConfigError as err:
        problems.append(_one_line(err))
    m = cfg.model
    folders = {"llm_path": (m.llm_path, "config.json"), "whisper_path": (m.whisper_path, "config.json"),
               "tokenizer_path": (m.tokenizer_path, None)}
    for name, (value, must_hold) in folders.items():
        flag = f"--model.{name.replace('_', '-')}"
        if value is None:
            continue
        if not str(value).strip():
            problems.append(f"{flag} is empty (leave it out for the tiny built-in part)")
        elif not Path(value).is_dir():
            problems.append(f"{flag} {value}: no such folder")
        elif must_hold and not (Path(value) / must_hold).is_file():
            problems.append(f"{flag} {value}: no {must_hold} in it (a transformers model folder is needed)")
        elif not any(Path(value).iterdir()):
            problems.append(f"{flag} {value}: the folder is empty")
    if m.avhubert_path is not None and not Path(m.avhubert_path).is_file():
        problems.append(f"--model.avhubert-path {m.avhubert_path!r}: no such file (the fairseq AV-HuBERT .pt)")
    d = cfg.data
    remote = is_remote(d.shard_dir)
    demo = not remote and Path(d.shard_dir).resolve() == Path(DEMO_SHARD_DIR).resolve()   # built on first use
    if not demo:
        splits = [d.train_split, d.eval_split]
        if cfg.train.test_at_end or cfg.train.eval_untrained:
            splits.append(d.test_split)
        if remote:       # the store reachable and the indexes there (retried like every remote read)
            try:
                missing = [s for s in splits if not exists(index_location(d.shard_dir, s), d.retry_policy)]
                if missing:
                    problems.append(f"--data.shard-dir {redact(d.shard_dir)}: no shard index for split(s) "
                                    f"{missing}")
            except OSError as err:
                problems.append(f"--data.shard-dir {redact(d.shard_dir)}: {_one_line(redact(str(err)))}")
        elif not Path(d.shard_dir).is_dir():
            problems.append(f"--data.shard-dir {d.shard_dir}: no such folder")
        else:
            missing = [s for s in splits if not index_path(d.shard_dir, s).is_file()]
            if missing:
                have = sorted(p.name for p in Path(d.shard_dir).glob("*.index.json"))
                problems.append(f"--data.shard-dir {d.shard_dir}: no shard index for split(s) {missing} "
                                f"(found: {have or 'none'}; build shards with `python -m data_tools`)")
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        problems.append(f"--train.resume {resume}: no such checkpoint folder")
    return problems
