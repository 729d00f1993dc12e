"""The experiment config from the command line and recipes: precedence, validation, clear errors."""
import pytest

from tests.constants import REPO
from trainer.config import ExperimentConfig, load_recipe, parse_args


def test_defaults_are_the_demo():
    cfg = parse_args([])
    assert cfg.model.llm_path is None and cfg.data.shard_dir == "data/synth"
    assert cfg.config.endswith("ds_configs/zero3.json")


def test_command_line_beats_recipe_beats_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {modality: asr, lora_r: 4}\ntrain: {lr: 0.002, max_steps: 50}\n")
    cfg = parse_args(["--recipe", str(recipe), "--train.lr", "0.005", "--local_rank=0"])
    assert cfg.train.lr == 0.005                     # command line
    assert cfg.train.max_steps == 50 and cfg.model.lora_r == 4 and cfg.model.modality == "asr"   # recipe
    assert not cfg.model.streams().video             # the pipeline decodes what the model reads
    assert cfg.recipe == str(recipe)


def test_the_ds_config_is_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_args([]).config == str(REPO / "ds_configs" / "zero3.json")
    assert parse_args(["--config", str(REPO / "ds_configs" / "zero2.json")]).config.endswith("zero2.json")


@pytest.mark.parametrize("text, message", [
    ("model: {modality: speech}", "--model.modality must be one of"),
    ("train: {lr: -1}", "--train.lr must be > 0"),
    ("train: {warmup_steps: 500, max_steps: 100}", "--train.warmup-steps must be in [0, --train.max-steps]"),
    ("train: {learning_rate: 0.1}", "unknown option(s) ['learning_rate']"),
    ("optimizer: {lr: 0.1}", "unknown option(s) ['optimizer']"),
    ("- just a list", "must be a mapping"),
])
def test_bad_recipes_are_clear_errors(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError) as err:
        load_recipe(recipe)
    assert message in str(err.value)


def test_bad_command_line_values_stop_before_anything_starts():
    from trainer.config import ConfigError     # one line each (tests/test_bad_inputs.py has the whole table)

    with pytest.raises(ConfigError, match="--train.max-steps must be an int >= 1, got 0"):
        parse_args(["--train.max-steps", "0"])
    with pytest.raises(ConfigError, match="no such DeepSpeed JSON"):
        parse_args(["--config", "no/such.json"])
    with pytest.raises(ConfigError, match="--recipe needs a path"):
        parse_args(["--recipe"])


def test_to_dict_round_trips_through_a_recipe(tmp_path):
    import yaml
    cfg = parse_args(["--model.modality", "vsr", "--train.max-steps", "70"])
    d = cfg.to_dict()
    del d["config"], d["recipe"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    again = load_recipe(tmp_path / "r.yaml")
    assert isinstance(again, ExperimentConfig)
    assert again.model == cfg.model and again.train == cfg.train and again.data == cfg.data


def _sections(cls=ExperimentConfig, prefix=""):
    """(dotted section, dataclass) for every config section, nested ones included."""
    import dataclasses

    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            yield f"{prefix}{f.name}", type(default)
            yield from _sections(type(default), f"{prefix}{f.name}.")


def test_one_field_per_fact():
    """No option is spelled in two sections (two homes for one fact drift apart), except the two seeds,
    which seed different things (model init and dropout; data order)."""
    import dataclasses

    homes: dict[str, list[str]] = {}
    for section, cls in _sections():
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING
                                            else None):
                homes.setdefault(f.name, []).append(section)
    twice = {name: where for name, where in homes.items() if len(where) > 1}
    assert twice == {"seed": ["data", "train"]}, twice


def test_the_tiny_model_sizes_are_nested_on_the_command_line_and_in_recipes(tmp_path):
    cfg = parse_args(["--model.tiny.llm-layers", "2", "--model.tiny.whisper-width", "32"])
    assert (cfg.model.tiny.llm_layers, cfg.model.tiny.whisper_width, cfg.model.tiny.llm_width) == (2, 32, 128)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {tiny: {avhubert_layers: 3, n_mels: 128}}\n")
    cfg = load_recipe(recipe)
    assert cfg.model.tiny.avhubert_layers == 3 and cfg.model.streams().n_mels == 128
    assert cfg.model.tiny.llm_layers == 4                     # the rest of tiny keeps its defaults


def test_an_unknown_option_is_one_line_naming_the_close_known_one(tmp_path):
    from trainer.config import ConfigError

    for args in (["--model.llm-layers", "2"], ["--model.llm-layers=2"]):
        with pytest.raises(ConfigError) as err:
            parse_args(args)
        message = str(err.value)
        assert "--model.llm-layers" in message and "did you mean --model.tiny.llm-layers" in message, message
        assert "\n" not in message
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {llm_layers: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['llm_layers'\].*llm_layers -> tiny.llm_layers"):
        parse_args(["--recipe", str(recipe)])


# Each config check broken once: every problem must start with the flag a user sets to fix it.
BAD_VALUES = {
    "model": dict(modality="lip", downsample="max", decorrelation_impl="cuda", load_dtype="int8",
                  modality_order=("audio",), audio_rate=0, video_rate=0, projector_hidden=0, lora_r=0,
                  lora_dropout=1.0, lora_targets=(), decorrelation_weight=-1.0, decorrelation_layers=(-1, -1)),
    "model.tiny": dict(tokenizer="word", tokenizer_vocab=0, llm_layers=0, llm_width=30, llm_ffn=0,
                       llm_init_std=0.0, n_mels=0, whisper_layers=0, whisper_width=30,
                       whisper_init_std=0.0, whisper_max_source_positions=0, avhubert_layers=0,
                       avhubert_width=30, avhubert_ffn=0, avhubert_resnet_channels=0),
    "data": dict(shard_dir="ftp://host/x", cache_max_gb=0, remote_attempts=0, remote_timeout_s=0, noise="pink",
                 max_frames_per_batch=0, max_batch_size=0, crop_size=0, prefetch_factor=0, max_initial_failures=0,
                 sort_buffer=-1, shuffle_buffer=-1, num_workers=-1, samples_per_epoch=-1, batches_per_epoch=-1,
                 noise_prob=2.0, train_split="val"),
    "train": dict(max_steps=0, grad_accum=0, log_every=0, keep_last=0, eval_beams=0, eval_every=-1, save_every=-1,
                  lr=0, warmup_steps=-1, min_lr_ratio=2, grad_clip=-1, final_eval_beams=0, eval_max_samples=0,
                  final_eval_max_samples=0, stop_after=0, final_eval_splits=("",)),
    "tracking": dict(connect_timeout_s=0, exit_timeout_s=-1, system_metrics_every_s=-1, max_queue=0),
    "monitor": dict(every=-1, sink_epsilon=1.0, sink_min_queries=0, top_k=0, probe_batch_size=0,
                    max_massive_entries=0, massive_abs=-1, massive_ratio=0.5, layers=(), figure_head=-1),
}
BAD_WITH = {"model.tiny": dict(llm_heads=4, whisper_heads=4, avhubert_heads=3)}    # valid, but not with those
# (bad values, the valid values they are bad with): checks that the first set hides
MORE_BAD_VALUES = {
    "model": (dict(video_lora=True, decorrelation_layers=()), dict(freeze_video_encoder=False, modality="asr")),
    "data": (dict(min_clip_frames=800, babble_speakers=0), dict(max_clip_frames=700, noise="babble")),
}


@pytest.mark.parametrize("section", sorted(BAD_VALUES))
def test_every_validation_message_names_its_flag(section):
    import dataclasses

    classes = dict(_sections())
    cls = classes[section]
    fields = {f.name for f in dataclasses.fields(cls)}
    for bad, context in ((BAD_VALUES[section], BAD_WITH.get(section, {})),
                         MORE_BAD_VALUES.get(section, ({}, {}))):
        if not bad:
            continue
        with pytest.raises(ValueError) as err:
            cls(**bad, **context)
        problems = str(err.value).split("; ")
        named = set()
        for problem in problems:
            flag = problem.split()[0]
            assert flag.startswith(f"--{section}."), problem
            named.add(flag[len(section) + 3:].replace("-", "_"))
        assert named <= fields, named - fields
        assert named >= set(bad), set(bad) - named         # every broken value is reported


def test_a_run_folder_whose_saved_options_this_code_does_not_take_is_one_clear_line(tmp_path):
    import json

    from trainer.run_folder.load import load_run_config

    cfg = parse_args(["--model.modality", "asr", "--model.tiny.llm-layers", "3"]).to_dict()
    (tmp_path / "experiment.json").write_text(json.dumps(cfg))
    run = load_run_config(tmp_path)
    assert run.model == parse_args(["--model.modality", "asr", "--model.tiny.llm-layers", "3"]).model
    assert (run.seed, run.eval_beams, run.eval_max_new_tokens) == (1234, 1, 32)
    cfg["model"]["llm_layers"] = cfg["model"]["tiny"].pop("llm_layers")       # a key this trainer does not have
    (tmp_path / "experiment.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_run_config(tmp_path)
    message = str(err.value)
    assert "does not match this trainer's options" in message and "llm_layers -> tiny.llm_layers" in message
    assert "\n" not in message


def test_final_evaluation_splits_cap_beams_and_off():
    from trainer.config import final_eval_splits

    assert final_eval_splits(parse_args([])) == ["val", "test"]
    assert final_eval_splits(parse_args(["--data.eval-split", "dev"])) == ["dev", "test"]
    assert final_eval_splits(parse_args(["--train.final-eval-splits", "val"])) == ["val"]
    assert final_eval_splits(parse_args(["--train.final-eval-splits", "test", "val", "test"])) == ["test", "val"]
    assert final_eval_splits(parse_args(["--train.final-eval-splits"])) == []       # no end-of-run evaluation
    cfg = parse_args(["--train.final-eval-max-samples", "5", "--train.final-eval-beams", "3"]).train
    assert (cfg.final_eval_max_samples, cfg.final_eval_beams) == (5, 3)
    from trainer.engine.config import TrainConfig
    for bad in ({"final_eval_max_samples": 0}, {"final_eval_beams": 0}):
        with pytest.raises(ValueError, match="--train.final-eval"):
            TrainConfig(**bad)
        with pytest.raises(ValueError, match="--train.final-eval"):      # ConfigError: one line
            parse_args([f"--train.{next(iter(bad)).replace('_', '-')}", "0"])


def _bad_inputs(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"train_micro_batch_size_per_gpu": "auto",, }')
    empty_llm = tmp_path / "empty_llm"
    empty_llm.mkdir()
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train: {max_step: 10}\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train.index.json").write_text('{"split": "train", "shards": []}')
    return [
        (["--config", str(bad_json)], f"DeepSpeed config {bad_json} is not valid JSON"),
        (["--data.shard-dir", str(tmp_path / "no_such_shards")], "no_such_shards: no such folder"),
        (["--data.shard-dir", str(shards)], "no shard index for split(s) ['val', 'test']"),
        (["--model.llm-path", str(empty_llm)], "no config.json in it"),
        (["--model.llm-path", ""], "--model.llm-path is empty"),
        (["--model.llm-path", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["--recipe", str(recipe)], "unknown option(s) ['max_step']"),
    ]


def test_bad_inputs_fail_in_the_parse_step_with_one_line_and_write_nothing(tmp_path):
    """launch/train.py as a real process (no launcher, no process group): each bad input is one line on
    stderr, exit code 2, and the run folder is never created (no checkpoints/, no tokenizer/)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0"}
    for args, message in _bad_inputs(tmp_path):
        run_dir = tmp_path / "run"
        p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--train.run-dir", str(run_dir),
                            *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, p.stderr)
        assert not run_dir.exists(), args
