"""Every input a user can get wrong: one line naming the input, the problem and what is
accepted; exit status 2; seconds, before any process group; nothing created or changed on disk.

Most cases run in-process through the functions the entry points call (build_config for recipes,
parse_args for the command line and the inputs it reads); a smaller set runs each entry point as a real
process and compares the folder tree (names, sizes, mtimes) before and after. The config-field table is
generated from the ExperimentConfig dataclasses, so a new field is covered without editing this file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.constants import REPO
from tests.helpers import child_env, free_port
from trainer.config import ConfigError, ExperimentConfig, parse_args
from trainer.config_checks import build_config, flag

# int/float fields that take a negative value on purpose (anything else must refuse -1)
NEGATIVE_OK = {"data.snr_db": "below 0 dB is a real noise condition"}


def _leaves(cls, prefix=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaves(hint, prefix + (f.name,))
        else:
            yield prefix + (f.name,), hint


def _base(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) else hint


def _wrong_types(hint) -> list:
    base = _base(hint)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return ["bogus", 3]
    if origin is tuple:
        return [5, ["ok", {"a": 1}] if typing.get_args(base)[0] is str else ["x"]]
    return {bool: ["maybe", 1], int: ["lots", 2.5, True], float: ["lots", [1.0]], str: [7, ["a"]]}[base]


def _out_of_range(hint) -> list:
    base = _base(hint)
    return {int: [-1], float: [-1.0, math.nan, math.inf]}.get(base, [])


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


FIELDS = list(_leaves(ExperimentConfig))
WRONG_TYPE = [(p, v) for p, h in FIELDS for v in _wrong_types(h)]
OUT_OF_RANGE = [(p, v) for p, h in FIELDS for v in _out_of_range(h)]


def _recipe_error(path, value) -> str | None:
    try:
        build_config(ExperimentConfig, _nest(path, value), "recipe r.yaml")
    except ValueError as err:
        return str(err)
    return None


def test_every_field_refuses_a_value_of_the_wrong_type_naming_its_flag():
    for path, value in WRONG_TYPE:
        message = _recipe_error(path, value)
        name = flag(".".join(path[:-1]), path[-1])
        assert message is not None, (path, value)
        assert name in message and "must be" in message and "\n" not in message, (path, value, message)


def test_every_number_field_refuses_out_of_range_values_naming_its_flag():
    accepted = []
    for path, value in OUT_OF_RANGE:
        message = _recipe_error(path, value)
        dotted = ".".join(path)
        if message is None:
            if not (dotted in NEGATIVE_OK and value == -1):
                accepted.append((dotted, value))
            continue
        assert flag(".".join(path[:-1]), path[-1]) in message and "\n" not in message, (path, value, message)
    assert not accepted, f"accepted, and not in NEGATIVE_OK: {accepted}"


def test_the_table_covers_every_field():
    assert len(FIELDS) > 100 and {p for p, _ in WRONG_TYPE} == {p for p, _ in FIELDS}


# ---- the command line and the inputs it names, in-process --------------------------------------------
def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _ds(tmp: Path, name: str, **changes) -> str:
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    zero = changes.pop("zero", {})
    cfg.update(changes)
    cfg["zero_optimization"].update(zero)
    return _write(tmp / "ds" / f"{name}.json", json.dumps(cfg))


def _shards(tmp: Path, name: str, train_index: str | None) -> str:
    folder = tmp / "shards" / name
    for split in ("train", "val", "test"):
        _write(folder / f"{split}-000000.tar", "x")
        text = json.dumps({"split": split, "version": 1, "shards": [
            {"name": f"{split}-000000.tar", "samples": 1, "duration": 1.0}]})
        _write(folder / f"{split}.index.json", train_index if split == "train" and train_index is not None else text)
    return str(folder)


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, what the one line must contain)."""
    good = json.dumps({"split": "train", "version": 1, "shards": [
        {"name": "train-000000.tar", "samples": 1, "duration": 1.0}]})
    afile = _write(tmp / "afile", "x")
    ro = tmp / "readonly"
    ro.mkdir(exist_ok=True)
    (tmp / "index_is_dir").mkdir(exist_ok=True)
    return [
        # the command line
        (["--train.max-steps", "lots"], "--train.max-steps must be an int, got 'lots'"),
        (["--train.lr", "fast"], "--train.lr must be a number"),
        (["--train.max-step", "3"], "did you mean --train.max-steps"),
        (["--train.precision", "fp8"], "'fp8'"),
        (["--train.eval-untrained", "maybe"], "'maybe'"),
        (["--model.audio-rate", "0"], "--model.audio-rate must be an int >= 1"),
        (["--data.noise-prob", "nan"], "--data.noise-prob must be in [0, 1]"),
        (["--model.llm-layers", "2"], "did you mean --model.tiny.llm-layers"),
        (["--recipe"], "--recipe needs a path"),
        # recipes
        (["--recipe", _write(tmp / "r" / "lots.yaml", 'train: {max_steps: "lots"}\n')],
         "--train.max-steps must be an int, got 'lots'"),
        (["--recipe", _write(tmp / "r" / "typo.yaml", "train: {max_step: 3}\n")], "max_step -> max_steps"),
        (["--recipe", _write(tmp / "r" / "section.yaml", "trian: {max_steps: 3}\n")], "trian -> train"),
        (["--recipe", _write(tmp / "r" / "empty.yaml", "")], "the file is empty"),
        (["--recipe", _write(tmp / "r" / "list.yaml", "- a\n")], "must be a mapping"),
        (["--recipe", _write(tmp / "r" / "yaml.yaml", "train: {max_steps: [\n")], "recipe"),
        (["--recipe", str(tmp / "r")], "recipe"),
        (["--recipe", str(tmp / "r" / "missing.yaml")], "missing.yaml"),
        # the DeepSpeed JSON
        (["--config", _ds(tmp, "stage7", zero={"stage": 7})], "zero_optimization.stage is 7; DeepSpeed accepts 0, 1, 2"),
        (["--config", _ds(tmp, "bucket0", zero={"reduce_bucket_size": 0})], "reduce_bucket_size is 0"),
        (["--config", _ds(tmp, "bucketneg", zero={"stage3_prefetch_bucket_size": -5})],
         "stage3_prefetch_bucket_size is -5"),
        (["--config", _ds(tmp, "offgpu", zero={"offload_optimizer": {"device": "gpu"}})],
         "offload_optimizer.device is 'gpu'; one of ('none', 'cpu', 'nvme')"),
        (["--config", _ds(tmp, "offparam2", zero={"stage": 2, "offload_param": {"device": "cpu"}})],
         "offload_param needs stage 3"),
        (["--config", _ds(tmp, "nvme", zero={"offload_param": {"device": "nvme"}})], "without an nvme_path"),
        (["--config", _ds(tmp, "total", train_batch_size=100)], "train_batch_size is 100 but micro batch (64)"),
        (["--config", _ds(tmp, "micro", train_micro_batch_size_per_gpu=8)], "--data.max-batch-size is 64"),
        (["--config", _ds(tmp, "gas", gradient_accumulation_steps=0)], "gradient_accumulation_steps is 0"),
        (["--config", _ds(tmp, "clip", gradient_clippin=1.0)], "did you mean gradient_clipping"),
        (["--config", _ds(tmp, "zkey", zero={"reduce_bucket_sise": 5})],
         "unknown key zero_optimization.reduce_bucket_sise (did you mean reduce_bucket_size"),
        (["--config", _ds(tmp, "ztype", zero={"overlap_comm": "sometimes"})], "zero_optimization.overlap_comm"),
        (["--config", _write(tmp / "ds" / "list.json", "[1]")], "must be a JSON object"),
        (["--config", _write(tmp / "ds" / "cut.json", '{"zero_optimization": {"sta')], "is not valid JSON"),
        (["--config", _write(tmp / "ds" / "empty.json", "")], "is not valid JSON"),
        (["--config", str(tmp / "ds" / "none.json")], "no such DeepSpeed JSON"),
        # shard sets
        (["--data.shard-dir", _shards(tmp, "cut", good[:40])], "cut short"),
        (["--data.shard-dir", _shards(tmp, "foreign", '{"files": ["a.tar"]}')], "not a shard index of this format"),
        (["--data.shard-dir", _shards(tmp, "listjson", "[1, 2]")], "not a shard index of this format"),
        (["--data.shard-dir", _shards(tmp, "v2", good.replace('"version": 1', '"version": 2'))],
         "format version 2; this code reads version 1"),
        (["--data.shard-dir", _shards(tmp, "noshards", '{"split": "train", "shards": []}')], "lists no shards"),
        (["--data.shard-dir", _shards(tmp, "gone", good.replace("train-000000", "train-000009"))],
         "none of the 1 shards"),
        (["--data.shard-dir", afile], "no such folder"),
        (["--data.shard-dir", str(tmp / "empty_dir")], "no shard index for split(s)"),
        (["--data.shard-dir", ""], "--data.shard-dir"),
        # model paths
        (["--model.llm-path", afile], "no such folder"),
        (["--model.whisper-path", str(tmp / "index_is_dir")], "no config.json in it"),
        (["--model.avhubert-path", str(tmp)], "no such file"),
        # the run folder
        (["--train.run-dir", afile], "is a file, not a folder"),
        (["--train.run-dir", afile + "/run"], "is a file, so the folder cannot be created"),
        (["--train.run-dir", str(ro / "run")], "read-only"),
        (["--train.resume", str(tmp / "no_ckpt")], "no such checkpoint folder"),
    ]


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "empty_dir").mkdir()
    cases = _cases(tmp_path)
    ro = tmp_path / "readonly"
    mounted = _read_only(ro)
    yield cases
    if mounted:
        subprocess.run(["umount", str(ro)], check=False)
    ro.chmod(0o755)


def _read_only(folder: Path) -> bool:
    """A folder no write reaches: chmod for a user; for root (whom chmod does not stop) a read-only tmpfs."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    return True


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if "readonly" not in p.parts}


def test_command_line_and_inputs_are_one_line_each_and_write_nothing(inputs, tmp_path):
    before = _tree(tmp_path)
    for args, expected in inputs:
        with pytest.raises(ConfigError) as err:
            parse_args(["--train.run-dir", str(tmp_path / "run"), *args] if "--train.run-dir" not in args else args)
        message = str(err.value)
        assert expected in message and "\n" not in message and "Traceback" not in message, (args, message)
    assert _tree(tmp_path) == before
    assert len(inputs) >= 45


def test_world_size_from_the_launcher_enters_the_batch_arithmetic(tmp_path, monkeypatch):
    ds = _ds(tmp_path, "total128", train_batch_size=128)
    monkeypatch.setenv("WORLD_SIZE", "2")
    parse_args(["--config", ds, "--train.run-dir", str(tmp_path / "run")])        # 64 x 1 x 2: accepted
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"x world size \(3\) = 192"):
        parse_args(["--config", ds, "--train.run-dir", str(tmp_path / "run")])


# ---- each entry point as a real process --------------------------------------------------------------
def _entry_cases(tmp: Path) -> list[tuple[list[str], dict, str]]:
    """(command, extra environment, what the error line must contain)."""
    py = sys.executable
    train = [py, str(REPO / "launch" / "train.py"), "--train.run-dir", str(tmp / "run")]
    afile = _write(tmp / "afile", "x")
    cut = _shards(tmp, "cut", '{"split": "train", "shards": [{"na')
    stage7 = _ds(tmp, "stage7", zero={"stage": 7})
    recipe = _write(tmp / "lots.yaml", 'train: {max_steps: "lots"}\n')
    (tmp / "notrun").mkdir()
    ds_launch = [py, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                 str(REPO / "launch" / "train.py"), "--train.run-dir", str(tmp / "run")]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(REPO / "launch" / "train.py"), "--train.run-dir", str(tmp / "run")]
    slurm = {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "AVSR_NPROC_PER_NODE": "1"}
    return [
        (train + ["--config", stage7], {}, "zero_optimization.stage is 7"),
        (train + ["--data.shard-dir", cut], {}, "cut short"),
        (train + ["--recipe", recipe], {}, "--train.max-steps must be an int, got 'lots'"),
        (train + ["--model.llm-layers", "2"], {}, "did you mean --model.tiny.llm-layers"),
        (ds_launch + ["--config", stage7], {}, "zero_optimization.stage is 7"),
        (torchrun + ["--data.shard-dir", cut], {}, "cut short"),
        ([py, str(REPO / "launch" / "evaluate.py"), "--run-dir", str(tmp / "missing")], {}, "run folder not found"),
        ([py, str(REPO / "launch" / "evaluate.py"), "--run-dir", str(tmp / "notrun")], {}, "no experiment.json"),
        ([py, str(REPO / "launch" / "analyze_sinks.py"), "--run-dir", str(tmp / "notrun"), "--out",
          str(tmp / "sinks")], {}, "no experiment.json"),
        ([py, "-m", "data_tools", "synth", "--num", "x"], {}, "invalid int value: 'x'"),
        ([py, "-m", "data_tools", "lrs3", str(tmp / "missing"), str(tmp / "out"), "--split", "train"], {},
         "does not exist"),
        ([py, "-m", "data_tools", "validate", afile], {}, "is not a folder"),
        ([py, "-m", "data_tools", "pretrained", "--out", afile, "--no-download"], {}, "is a file, not a folder"),
        ([py, str(REPO / "launch" / "slurm" / "plan.py"), "dry-run", str(tmp / "no.yaml"), stage7], slurm,
         "recipe"),
        ([py, str(REPO / "launch" / "slurm" / "plan.py"), "dry-run", recipe, stage7],
         {**slurm, "SLURM_NNODES": "two"}, "invalid literal"),
        (["bash", str(REPO / "launch" / "study.sh")], {"STEPS": "lots"}, "STEPS=lots"),
        (["bash", str(REPO / "launch" / "study.sh")], {"RUNS": "a:1:ln"}, "RUNS: a:1:ln"),
    ]


def _launched(cmd: list[str]) -> bool:
    return "deepspeed.launcher.runner" in cmd or "torch.distributed.run" in cmd


def test_every_entry_point_exits_2_with_one_line_and_writes_nothing(tmp_path):
    _check_entry_points(tmp_path, [c for c in _entry_cases(tmp_path) if not _launched(c[0])])


@pytest.mark.slow
def test_under_the_launchers_too(tmp_path):
    """deepspeed and torchrun start 2 ranks each (~1 min here): the same single line, said once."""
    _check_entry_points(tmp_path, [c for c in _entry_cases(tmp_path) if _launched(c[0])])


def _check_entry_points(tmp_path: Path, cases: list) -> None:
    env = child_env(DS_ACCELERATOR="cpu")
    before, repo_before = _tree(tmp_path), sorted(p.name for p in REPO.iterdir())

    def run(case):
        cmd, extra, _ = case
        return subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra}, cwd=tmp_path, timeout=240)

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(run, cases))
    for (cmd, _, expected), p in zip(cases, done):
        launched = _launched(cmd)
        ours = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1 and expected in ours[0], (cmd, p.stderr[-3000:])
        if launched:         # the launcher adds its own lines; the ranks said it once, with no traceback
            assert p.returncode != 0 and "launch/train.py\", line" not in p.stderr, (cmd, p.stderr[-3000:])
        else:
            assert p.returncode == 2 and p.stderr.strip() == ours[0] and "Traceback" not in p.stdout, \
                (cmd, p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in REPO.iterdir()) == repo_before


def test_the_end_of_run_account_of_skipped_data():
    from trainer.data.skips import skip_report

    report = skip_report({"audio_decode": 2, "too_long": 1, "tar_error": 3, "resampled_audio": 4, "video_fps": 0})
    assert report["samples"] == 3 and report["shard_read_errors"] == 3
    assert report["by_reason"] == {"audio_decode": 2, "too_long": 1} and report["notes"] == {"resampled_audio": 4}
    assert report["summary"] == "3 samples skipped (audio_decode 2, too_long 1); 3 shard read errors"
    assert skip_report({})["summary"] == "nothing skipped"
