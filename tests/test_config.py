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
    assert cfg.data.modality == "asr"                # the pipeline follows the model's modality
    assert cfg.recipe == str(recipe)


def test_the_ds_config_is_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_args([]).config == str(REPO / "ds_configs" / "zero3.json")
    assert parse_args(["--config", str(REPO / "ds_configs" / "zero2.json")]).config.endswith("zero2.json")


@pytest.mark.parametrize("text, message", [
    ("model: {modality: speech}", "modality"),
    ("train: {lr: -1}", "train.lr must be > 0"),
    ("train: {warmup_steps: 500, max_steps: 100}", "warmup_steps"),
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
    with pytest.raises(SystemExit):
        parse_args(["--train.max-steps", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--config", "no/such.json"])
    with pytest.raises(SystemExit, match="--recipe needs a path"):
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


def test_final_evaluation_splits_cap_beams_and_off():
    from trainer.engine.trainer import final_eval_splits

    assert final_eval_splits(parse_args([])) == ["val", "test"]
    assert final_eval_splits(parse_args(["--train.test-at-end", "False"])) == ["val"]
    assert final_eval_splits(parse_args(["--data.eval-split", "dev"])) == ["dev", "test"]
    assert final_eval_splits(parse_args(["--train.final-eval-splits", "test", "val", "test"])) == ["test", "val"]
    assert final_eval_splits(parse_args(["--train.final-eval-splits"])) == []
    assert final_eval_splits(parse_args(["--train.final-eval", "False"])) == []
    cfg = parse_args(["--train.final-eval-max-samples", "5", "--train.final-eval-beams", "3"]).train
    assert (cfg.final_eval_max_samples, cfg.final_eval_beams) == (5, 3)
    from trainer.engine.config import TrainConfig
    for bad in ({"final_eval_max_samples": 0}, {"final_eval_beams": 0}):
        with pytest.raises(ValueError, match="final_eval"):
            TrainConfig(**bad)
        with pytest.raises(SystemExit):
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
