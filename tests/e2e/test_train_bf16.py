"""bf16 end to end, as every GPU run trains, on DeepSpeed's CPU accelerator (2 processes over gloo).

With the shipped JSON files and `--train.precision bf16`: ZeRO-3 under the `deepspeed` launcher (the
session run's options, tests/helpers.py) trains, evaluates at the end, and its exports and
launch/evaluate.py work; the Triton kernel runs (interpreted) on bf16 hidden states. ZeRO-2 (which casts
parameters but not AV-HuBERT's BatchNorm buffers) trains too. A bf16 ZeRO-3 checkpoint restored bit for
bit: tests/trainer/engine/test_checkpoint.py. The fp32 path is tests/e2e/test_train_zero3.py.
"""
import json

import pytest
import torch

from tests.constants import REPO
from tests.helpers import RUNS, TINY_STEPS, child_env, command, mlflow_losses, mlflow_run, run, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bf16_run(trained_run):
    return trained_run("zero3_2proc_bf16").folder


def test_bf16_zero3_trains_and_evaluates(bf16_run):
    resolved = json.loads((bf16_run / "ds_config.resolved.json").read_text())
    assert resolved["bf16"]["enabled"] is True and resolved["zero_optimization"]["stage"] == 3
    a = mlflow_losses(bf16_run)
    assert len(a) == TINY_STEPS and a[-1] < a[0], a
    client, mrun = mlflow_run(bf16_run)
    assert mrun.info.status == "FINISHED" and mrun.data.params["train.precision"] == "bf16"
    assert 0 < mrun.data.metrics["val/avsr/cer"] < 5
    assert mrun.data.metrics["train/dec_loss_raw"] > 0          # the kernel ran on bf16 hidden states


def test_bf16_exports_hold_bf16_weights_that_peft_loads(bf16_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainer.engine.checkpoint import seed_everything
    from trainer.model import build_model
    from trainer.model.config import ModelConfig

    full = bf16_run
    trainable = load_file(str(full / "export" / "trainable.safetensors"))
    assert {t.dtype for t in trainable.values()} == {torch.bfloat16}
    seed_everything(1234)
    model = build_model(ModelConfig(decorrelation_weight=1.0, tokenizer_path=str(full / "tokenizer")))
    reloaded = PeftModel.from_pretrained(model.llm.get_base_model(), str(full / "export" / "adapters"))
    lora_b = {k.split("base_model.model.", 1)[-1]: v for k, v in trainable.items() if "lora_B" in k}
    sd = reloaded.state_dict()
    for suffix, tensor in lora_b.items():
        match = [k for k in sd if k.endswith(suffix)]
        assert match, suffix
        torch.testing.assert_close(sd[match[0]].float(), tensor.float())


def test_evaluate_tool_on_a_bf16_run(bf16_run, tmp_path):
    out = tmp_path / "eval"
    run(command(REPO / "launch" / "evaluate.py", "--run-dir", str(bf16_run), "--split", "val", "--max-new-tokens", "6",
                "--out", str(out)))
    clean = json.loads((out / "results.json").read_text())["conditions"]["clean"]
    assert clean["num_utterances"] > 0 and 0 <= clean["wer"] < 5, clean


def test_bf16_zero2_trains(tmp_path, synth_corpus):
    """Training only (no end-of-run evaluation or export: those are the ZeRO-3 run's)."""
    folder = tmp_path / "zero2"
    bf16 = RUNS["zero3_2proc_bf16"]
    train(folder, synth_corpus, *bf16.args, "--monitor.every", "0", "--train.save-every", "0",
          "--train.final-eval-splits", "--train.export-on-finish", "False", config="zero2.json",
          env=child_env(**dict(bf16.env)))
    resolved = json.loads((folder / "ds_config.resolved.json").read_text())
    assert resolved["bf16"]["enabled"] is True and resolved["zero_optimization"]["stage"] == 2
    losses = mlflow_losses(folder)
    assert len(losses) == TINY_STEPS and losses[-1] < losses[0], losses
