"""bf16 end to end, as every GPU run trains, on DeepSpeed's CPU accelerator (2 processes over gloo).

With the shipped JSON files and `--train.precision bf16`: ZeRO-3 under the `deepspeed` launcher,
stopped at step 3 and resumed by the same command, must give the uninterrupted run's per-step losses
exactly; its checkpoint, final evaluation, exports and launch/evaluate.py work; the Triton kernel runs
(interpreted) on bf16 hidden states. ZeRO-2 (which casts parameters but not AV-HuBERT's BatchNorm
buffers) trains too. The fp32 path is tests/e2e/test_train_zero3.py.
"""
import json
import subprocess
import sys

import pytest
import torch

from tests.constants import REPO
from tests.e2e.test_train_zero3 import STEPS, _env, _losses, _mlflow, _train

pytestmark = pytest.mark.slow
BF16 = ("--train.precision", "bf16")


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory, synth_corpus):
    root = tmp_path_factory.mktemp("bf16")
    full, resumed = root / "full", root / "resumed"
    _train(full, synth_corpus, *BF16, launcher="deepspeed")
    _train(resumed, synth_corpus, *BF16, "--train.stop-after", "3")
    _train(resumed, synth_corpus, *BF16)
    return full, resumed


def test_bf16_zero3_trains_resumes_exactly_and_evaluates(bf16_runs):
    full, resumed = bf16_runs
    resolved = json.loads((full / "ds_config.resolved.json").read_text())
    assert resolved["bf16"]["enabled"] is True and resolved["zero_optimization"]["stage"] == 3
    a, b = _losses(full), _losses(resumed)
    assert len(a) == STEPS and a[-1] < a[0], a
    assert a == b, (a, b)            # bf16 weights + fp32 master state restored bit for bit
    client, run = _mlflow(full)
    assert run.info.status == "FINISHED" and run.data.params["train.precision"] == "bf16"
    assert 0 < run.data.metrics["val/avsr/cer"] < 5
    assert run.data.metrics["train/dec_loss_raw"] > 0          # the kernel ran on bf16 hidden states


def test_bf16_exports_hold_bf16_weights_that_peft_loads(bf16_runs):
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainer.engine.checkpoint import seed_everything
    from trainer.model import build_model
    from trainer.model.config import ModelConfig

    full, _ = bf16_runs
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


def test_evaluate_tool_on_a_bf16_run(bf16_runs, tmp_path):
    full, _ = bf16_runs
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--run-dir", str(full), "--split", "val",
                        "--max-new-tokens", "6", "--out", str(out)], env=_env(), cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    clean = json.loads((out / "results.json").read_text())["conditions"]["clean"]
    assert clean["num_utterances"] > 0 and 0 <= clean["wer"] < 5, clean


def test_bf16_zero2_trains(tmp_path, synth_corpus):
    run = tmp_path / "zero2"
    _train(run, synth_corpus, *BF16, "--config", str(REPO / "ds_configs" / "zero2.json"),
           "--monitor.every", "0", "--train.save-every", "0")
    resolved = json.loads((run / "ds_config.resolved.json").read_text())
    assert resolved["bf16"]["enabled"] is True and resolved["zero_optimization"]["stage"] == 2
    losses = _losses(run)
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
