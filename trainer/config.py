"""The experiment config: one typed tree, from defaults, a recipe file and the command line.

    deepspeed launch/train.py --config ds_configs/zero3.json \
        --recipe launch/recipes/lrs3_avsr.yaml --train.lr 1e-3 --model.modality asr

Precedence: command line > recipe (YAML with sections model/data/train/monitor/tracking)
> defaults (a tiny model on the synthetic corpus; launch/recipes/demo.yaml sizes it for the CPU demo).
Every section validates itself when built (trainer/config_checks.py), all before any process group starts.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from trainer.config_checks import Problems, build_config, folder_problem, one_line
from trainer.data.config import DataConfig
from trainer.engine.config import TrainConfig
from trainer.model.config import ModelConfig
from trainer.monitor.config import MonitorConfig
from trainer.tracking.config import TrackingConfig

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
        # Each section has validated itself; what involves the file system or more than one section is
        # checked here, in one place, so a fact shared by sections is checked once and reported once.
        p = Problems("")
        path = Path(self.config)
        if not path.is_file() and not path.is_absolute() and (CHECKOUT / path).is_file():
            self.config = str(CHECKOUT / path)     # run from elsewhere: the checkout's ds_configs/
        else:
            p.check(path.is_file(), "config", f"{self.config}: no such DeepSpeed JSON (see ds_configs/)")
        p.raise_any()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def final_eval_splits(cfg: ExperimentConfig) -> list[str]:
    """The splits evaluated when training finishes (--train.final-eval-splits), in order. The default
    follows the data section's split names, so a run with another validation split needs no second flag."""
    if cfg.train.final_eval_splits is not None:
        return list(cfg.train.final_eval_splits)
    return list(dict.fromkeys([cfg.data.eval_split, cfg.data.test_split]))


def load_recipe(path: str | Path, **overrides: Any) -> ExperimentConfig:
    text = Path(path).read_text()
    if not text.strip():
        raise ValueError("the file is empty (a recipe is a YAML mapping of sections: model, data, train, ...)")
    raw = yaml.safe_load(text) or {}
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
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise ConfigError("--recipe needs a path to a YAML recipe (see launch/recipes/)")
        try:
            default = load_recipe(args[i + 1])
        except (OSError, ValueError, TypeError, yaml.YAMLError) as err:
            raise ConfigError(f"recipe {args[i + 1]}: {_one_line(err)}") from err
        del args[i:i + 2]
    cfg = _tyro_cli(tyro, default, args)
    if check:
        problems = check_inputs(cfg)
        if problems:
            raise ConfigError("; ".join(problems))
        cfg.model = pin_hub_revisions(cfg.model)
    return cfg


def pin_hub_revisions(m):
    """Hub-name parts pinned to the commit they resolved to (experiment.json then names the exact
    weights: a later evaluation or resume reads the same snapshot, whatever `main` has become)."""
    import dataclasses

    from trainer.model.hub import pretrained_sources

    pins = {f"{part}_revision": r.commit for part, r in pretrained_sources(m).items()
            if r.commit and part in ("llm", "whisper")}
    return dataclasses.replace(m, **pins) if pins else m


_one_line = one_line


def _tyro_cli(tyro, default: ExperimentConfig, args: list[str]) -> ExperimentConfig:
    """tyro's parse, its framed multi-line error turned into one ConfigError line (--help still prints)."""
    import contextlib
    import io

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(ExperimentConfig, default=default, args=args,
                            description="Train Llama-AVSR with DeepSpeed (see README.md).",
                            config=(tyro.conf.FlagConversionOff,))
    except SystemExit as exit_:
        if not exit_.code:
            raise                          # --help
        raise ConfigError(_flatten_tyro(captured.getvalue())) from None


def _flatten_tyro(text: str) -> str:
    """tyro's box (title, message, rule, "Perhaps you meant:" flags, rule, help footer) -> one line."""
    body = [line.strip().strip("│─").strip() for line in text.splitlines() if not line.strip()[:1] in ("╭", "╰")]
    sections, current = [], []
    for line in body:
        if not line or set(line) <= set("─ "):
            if current:
                sections.append(current)
            current = []
        else:
            current.append(line)
    if current:
        sections.append(current)
    sections = [sec for sec in sections if not sec[0].startswith("For full helptext")]
    if not sections:
        return one_line(text) or "bad command line (see --help)"
    message = re.sub(r"^Error parsing ((?!--)[\w.-]+: )?", "", " ".join(sections[0]))
    message = re.sub(r"^(--[\w.-]+): invalid literal for int\(\) with base 10: (.*)", r"\1 must be an int, got \2", message)
    message = re.sub(r"^(--[\w.-]+): could not convert string to float: (.*)", r"\1 must be a number, got \2",
                     message)
    meant = [line.split()[0] for sec in sections[1:] if sec[0].startswith("Perhaps you meant")
             for line in sec[1:] if line.startswith("--")]
    return one_line(message + (f" (did you mean {' or '.join(meant)}?)" if meant else "") + " (see --help)")


def check_inputs(cfg: ExperimentConfig) -> list[str]:
    """What the run will read, checked on the file system before any process starts training: the
    DeepSpeed JSON parses, pretrained paths hold what they should, the shard set has its indexes.
    Returns the problems (empty: all well)."""
    from trainer.data.shard_format import index_location, index_path
    from trainer.data.storage import exists, is_remote, redact
    from trainer.data.config import DEMO_SHARD_DIR
    from trainer.engine.ds_config import DeepSpeedConfigError, check_ds_config, load_ds_config, use_bf16

    problems: list[str] = []
    try:
        raw = load_ds_config(cfg.config)
        found = check_ds_config(raw, micro_batch_size=cfg.data.max_batch_size, grad_accum=cfg.train.grad_accum,
                                world_size=_launch_world_size())
        if found:
            problems.append(f"DeepSpeed config {cfg.config}: {', '.join(found)}")
        else:       # an explicit precision the JSON contradicts (the device is not known yet: no GPU check)
            use_bf16(cfg.train.precision, raw, on_cpu=True, bf16_supported=True)
    except DeepSpeedConfigError as err:
        problems.append(_one_line(err))
    problems += _check_run_dir(cfg.train.run_dir)
    from trainer.model.hub import PretrainedNotFound, resolve

    m = cfg.model
    if m.decorrelation_warmup_steps > cfg.train.max_steps:
        problems.append(f"--model.decorrelation-warmup-steps {m.decorrelation_warmup_steps} is more than "
                        f"--train.max-steps {cfg.train.max_steps}: lambda would never reach its value")
    folders = {"llm_path": (m.llm_path, m.llm_revision, "config.json"),
               "whisper_path": (m.whisper_path, m.whisper_revision, "config.json"),
               "tokenizer_path": (m.tokenizer_path, None, None)}
    for name, (value, revision, must_hold) in folders.items():
        flag = f"--model.{name.replace('_', '-')}"
        if value is None:
            continue
        if not str(value).strip():
            problems.append(f"{flag} is empty (leave it out for the tiny built-in part)")
            continue
        try:                # a folder, or a hub name found in (or fetched into) the Hugging Face cache
            folder = resolve(value, revision, flag).folder
        except PretrainedNotFound as err:
            problems.append(str(err))
            continue
        if must_hold and not (folder / must_hold).is_file():
            problems.append(f"{flag} {value}: no {must_hold} in it (a transformers model folder is needed)")
        elif not any(folder.iterdir()):
            problems.append(f"{flag} {value}: the folder is empty")
    if m.avhubert_path is not None and not Path(m.avhubert_path).is_file():
        problems.append(f"--model.avhubert-path {m.avhubert_path!r}: no such file (the fairseq AV-HuBERT .pt)")
    elif m.avhubert_path is not None and m.uses_video:     # its architecture and the flags agree (mmap: no tensor read)
        from trainer.model.avhubert import read_official_checkpoint, resolve_avhubert_config
        try:
            resolve_avhubert_config(read_official_checkpoint(m.avhubert_path), m.avhubert_attention_heads,
                                    m.avhubert_layer_norm_first)
        except (KeyError, ValueError) as err:
            problems.append(f"--model.avhubert-path: {_one_line(err.args[0] if err.args else err)}")
    d = cfg.data
    remote = is_remote(d.shard_dir)
    demo = not remote and Path(d.shard_dir).resolve() == Path(DEMO_SHARD_DIR).resolve()   # built on first use
    if not demo:
        splits = list(dict.fromkeys([d.train_split, d.eval_split, *final_eval_splits(cfg)]
                                    + ([d.test_split] if cfg.train.eval_untrained else [])))
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
            problems += _check_indexes(d.shard_dir, [s for s in splits if s not in missing])
    resume = cfg.train.resume
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        problems.append(f"--train.resume {resume}: no such checkpoint folder")
    return problems


def _launch_world_size() -> int:
    """The processes the launcher starts (deepspeed, torchrun and srun set WORLD_SIZE before the script)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _check_run_dir(run_dir: str) -> list[str]:
    """The run folder must be a folder this process can create or write: found now, not at the first
    checkpoint."""
    problem = folder_problem("--train.run-dir", run_dir)
    return [problem] if problem else []


def _check_indexes(shard_dir: str, splits: list[str]) -> list[str]:
    """Each split's index reads as one of this format (not cut short, not another tool's JSON, not a
    newer format version) and lists shards that are there."""
    from trainer.data.shard_format import index_name, load_index

    problems = []
    for split in splits:
        try:
            index = load_index(shard_dir, split)
        except (OSError, ValueError) as err:
            problems.append(f"--data.shard-dir {shard_dir}: {_one_line(err)}")
            continue
        if not index.shards:
            problems.append(f"--data.shard-dir {shard_dir}: {index_name(split)} lists no shards "
                            f"(rebuild the split with `python -m data_tools`)")
        elif not any(Path(url).is_file() for url in index.urls):
            problems.append(f"--data.shard-dir {shard_dir}: none of the {len(index.shards)} shards "
                            f"{index_name(split)} lists is there (first: {index.shards[0].name})")
    return problems
