"""trainer/engine/ds_config.py: the shipped DeepSpeed JSON files resolved ("auto" filled as HF Trainer would),
conflicts and mistakes as one error naming the setting."""
import json

import pytest

from tests.constants import REPO
from trainer.engine.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config

COMMON = dict(hidden_size=64, micro_batch_size=8, grad_accum=2, grad_clip=1.0, lr=1e-3, weight_decay=0.01,
              total_steps=100, warmup_steps=10, min_lr_ratio=0.1, bf16=False, on_cpu=True)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_shipped_configs_resolve_fully(name):
    cfg = resolve_ds_config(load_ds_config(REPO / "ds_configs" / name), **COMMON)
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["optimizer"]["params"]["lr"] == 1e-3
    assert "scheduler" not in cfg           # the trainer builds its own (trainer/engine/schedule.py)
    assert cfg["bf16"]["enabled"] is False
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 64 * 64
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert zero["stage3_param_persistence_threshold"] == 640
    # CPU without optimizer offload: plain torch AdamW (no op compile); offload keeps DeepSpeed's CPU Adam
    assert cfg["optimizer"]["params"].get("torch_adam", False) == ("offload_optimizer" not in zero)
    assert "auto" not in json.dumps(cfg)


def test_explicit_bucket_sizes_are_kept():
    """The sizing knobs are the user's tuning, not facts of the experiment config: a number stays."""
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["zero_optimization"].update(reduce_bucket_size=5e8, stage3_prefetch_bucket_size=123,
                                    stage3_param_persistence_threshold=100000)
    zero = resolve_ds_config(raw, **COMMON)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (5e8, 123, 100000)


def test_explicit_value_conflicting_with_experiment_is_an_error():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["gradient_accumulation_steps"] = 4
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps"):
        resolve_ds_config(raw, **COMMON)
    raw["gradient_accumulation_steps"] = 2          # agreeing explicit value is kept
    assert resolve_ds_config(raw, **COMMON)["gradient_accumulation_steps"] == 2


def test_a_users_deepspeed_scheduler_gets_its_auto_values_filled():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                              "cos_min_ratio": "auto"}}
    params = resolve_ds_config(raw, **COMMON)["scheduler"]["params"]
    assert params == {"total_num_steps": 100, "warmup_num_steps": 10, "cos_min_ratio": 0.1}


def test_unknown_auto_is_reported_with_its_path():
    raw = load_ds_config(REPO / "ds_configs" / "zero3.json")
    raw["zero_optimization"]["sub_group_size"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.sub_group_size"):
        resolve_ds_config(raw, **COMMON)


def test_a_json_that_does_not_parse_is_one_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_ds_config(bad)
