"""trainer/run_folder/evaluate.py without a model: the noise conditions, each condition's data config,
the request's checks and the printed table. (launch/evaluate.py on a trained run: tests/launch/test_evaluate.py.)"""
import json

import pytest

from tests.constants import REPO
from trainer.config import ExperimentConfig
from trainer.data.config import DataConfig
from trainer.run_folder.evaluate import (Condition, EvalRequest, check_request, condition_data, format_table,
                                         parse_conditions)


def test_conditions_in_the_order_given_clean_when_none():
    assert parse_conditions(None) == [Condition(None)]
    conditions = parse_conditions(["clean", "10", "-5dB", "0.5"])
    assert [c.name for c in conditions] == ["clean", "10dB", "-5dB", "0.5dB"]
    assert [c.snr_db for c in conditions] == [None, 10.0, -5.0, 0.5]


@pytest.mark.parametrize("values, message", [
    (["loud"], "'loud' is neither 'clean' nor a number of dB"),
    (["inf"], "'inf' is not a finite number of dB"),
    (["10", "10dB"], "repeated condition"),
])
def test_bad_conditions_are_one_error_naming_the_value(values, message):
    with pytest.raises(ValueError, match=message):
        parse_conditions(values)


def test_each_condition_mixes_every_clip_at_its_snr_or_none():
    data = DataConfig(shard_dir="x")
    clean = condition_data(data, Condition(None), "babble")
    assert clean.noise == "none" and clean.noise_in_eval is False
    noisy = condition_data(data, Condition(-5.0), "white")
    assert (noisy.noise, noisy.snr_db, noisy.noise_prob, noisy.noise_in_eval) == ("white", -5.0, 1.0, True)


@pytest.mark.parametrize("field, value, message", [
    ("noise", "pink", "--noise must be one of"), ("beams", 0, "--beams must be >= 1"),
    ("max_new_tokens", 0, "--max-new-tokens must be >= 1"), ("workers", -1, "--workers must be >= 0"),
])
def test_bad_requests_name_their_option(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalRequest(run_dir=tmp_path, out_dir=tmp_path / "out", **{field: value})


def test_the_request_is_checked_before_any_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = ExperimentConfig(config=str(REPO / "ds_configs" / "zero3.json")).to_dict()
    cfg["data"]["shard_dir"] = str(tmp_path / "shards")
    (run / "experiment.json").write_text(json.dumps(cfg))
    (tmp_path / "shards").mkdir()
    with pytest.raises((OSError, ValueError), match="--shards .* / --split test"):
        check_request(EvalRequest(run_dir=run, out_dir=tmp_path / "out"))
    with pytest.raises((OSError, ValueError), match="--run-dir"):
        check_request(EvalRequest(run_dir=tmp_path / "missing", out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_table_has_a_row_per_condition_and_names_skipped_clips():
    results = {"modality": "avsr", "split": "test", "shards": "/data/s", "noise": "babble", "weights": "checkpoint x",
               "beams": 1, "conditions": {
                   "clean": {"wer": 0.25, "cer": 0.125, "num_utterances": 8},
                   "-5dB": {"wer": 0.5, "cer": 0.3, "num_utterances": 7, "skipped/audio_decode": 1}}}
    lines = format_table(results).splitlines()
    assert lines[0] == "avsr on test (/data/s, babble noise); checkpoint x; beams 1"
    assert lines[2].split() == ["clean", "25.00", "12.50", "8"] and lines[3].split() == ["-5dB", "50.00", "30.00", "7"]
    assert lines[4] == "-5dB: 1 samples skipped (audio_decode 1)" and len(lines) == 5
