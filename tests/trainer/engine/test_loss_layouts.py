"""The gradient of a step is that of the token mean over the whole global batch, however the batch is
split into micro-batches and ranks (2 processes, real ZeRO-3, the trainer's own step).

Eight clips are laid out three ways on 2 ranks: 4 + 4 in one micro-batch each; grad_accum 2 with
micro-batches of 1 and 5 clips on rank 0 and 1 and 1 on rank 1; the reverse order split 3 + 1 and
2 + 2. With SGD at lr 1 and no clipping, weights after - before = -gradient: the gradients, the
logged loss, CE and decorrelation values must agree across layouts. (Averaging per-micro-batch means,
as DeepSpeed's engine.backward does by itself, weights the lone clips 5x and fails this.)
"""
import json

import pytest
import torch

from tests.constants import REPO
from tests.helpers import command, run

pytestmark = pytest.mark.slow

LAYOUTS = [
    [[[0, 1, 2, 3]], [[4, 5, 6, 7]]],
    [[[0], [1, 2, 3, 4, 5]], [[6], [7]]],
    [[[7, 6, 5], [4]], [[3, 2], [1, 0]]],
]
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
    "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


@pytest.fixture(scope="module")
def steps(tmp_path_factory, synth_corpus):
    return _run_layouts(tmp_path_factory.mktemp("layouts"), synth_corpus, DS_CONFIG, LAYOUTS)


def _run_layouts(root, synth_corpus, ds_config: dict, layouts: list):
    from trainer.data.text import iter_transcripts
    from trainer.model.tokenizer import train_bpe_tokenizer

    (root / "sgd.json").write_text(json.dumps(ds_config))
    train_bpe_tokenizer(list(iter_transcripts(str(synth_corpus), "train")), vocab_size=200) \
        .save_pretrained(str(root / "tokenizer"))
    trainer_args = ["--config", str(root / "sgd.json"), "--data.shard-dir", str(synth_corpus),
                    "--model.tokenizer-path", str(root / "tokenizer"), "--model.lora-dropout", "0",
                    "--model.decorrelation-weight", "1.0", "--train.lr", "1.0", "--train.warmup-steps", "0",
                    "--train.max-steps", "1", "--train.grad-clip", "0", "--tracking.enabled", "False",
                    "--monitor.every", "0", "--train.device", "cpu"]
    script = REPO / "tests" / "support" / "dist_grad_layout.py"
    run(command(script, "--layouts", json.dumps(layouts), "--out", str(root), "--", *trainer_args,
                launcher="torchrun", nproc=2))
    return root


def _grads(folder):
    from safetensors.torch import load_file

    before = load_file(str(folder / "before" / "trainable.safetensors"))
    after = load_file(str(folder / "after" / "trainable.safetensors"))
    # SGD at lr 1: the gradient, up to the fp32 rounding of the weights (an ulp of the largest one)
    return {k: ((before[k] - after[k]).double(), float(before[k].abs().max()) * 2.0 ** -23) for k in before}


def test_gradient_does_not_depend_on_the_layout(steps):
    ref = _grads(steps / "0")
    assert any("projector" in k and float(g.abs().max()) > 1e3 * ulp for k, (g, ulp) in ref.items())
    assert any("lora_B" in k and float(g.abs().max()) > 1e3 * ulp for k, (g, ulp) in ref.items())
    for i in range(1, len(LAYOUTS)):
        grads = _grads(steps / str(i))
        assert grads.keys() == ref.keys()
        for k, (g_ref, ulp) in ref.items():
            g = grads[k][0]
            # fp32 sums in another order: elements to 1e-4 relative, plus the weights' rounding
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=4 * ulp + 1e-6 * float(g_ref.abs().max()),
                                       msg=lambda m: f"layout {i}, {k}: {m}")
            assert float((g - g_ref).norm()) <= 1e-5 * float(g_ref.norm()) + 4 * ulp * g.numel() ** 0.5, (i, k)


def test_logged_values_are_the_global_token_means(steps):
    ref = json.loads((steps / "0" / "values.json").read_text())
    assert ref["lr"] == 1.0                          # warmup 0: the first step trains at the peak lr
    assert ref["loss"] == pytest.approx(ref["ce_loss"] + ref["dec_loss"], rel=1e-6)
    assert ref["dec_loss"] == pytest.approx(ref["dec_loss_raw"], rel=1e-6)     # weight 1.0
    for i in range(1, len(LAYOUTS)):
        values = json.loads((steps / str(i) / "values.json").read_text())
        for k in ("loss", "ce_loss", "dec_loss_raw", "grad_norm", "lr"):
            assert values[k] == pytest.approx(ref[k], rel=1e-5), (i, k, values[k], ref[k])


@pytest.fixture(scope="module")
def steps_zero2(tmp_path_factory, synth_corpus):
    """Two of the layouts under ZeRO-2, where the trainer measures the CE and lambda * L_dec gradient norms
    (ZeRO-3's partitioned parameters are out of autograd.grad's reach)."""
    cfg = {**DS_CONFIG, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    return _run_layouts(tmp_path_factory.mktemp("layouts_zero2"), synth_corpus, cfg, LAYOUTS[:2])


def test_term_gradient_norms_are_those_of_the_global_gradient(steps_zero2, steps):
    """The CE and lambda * L_dec gradient norms (logged on log steps; max-steps 1 makes step 1 one) are
    measured on the global batch: the same in both layouts (micro-batches and ranks summed), and the two
    terms add up to the step's gradient, whose norm the weights' change gives (triangle inequality both
    ways). Under ZeRO-3 they are not logged."""
    ref = json.loads((steps_zero2 / "0" / "values.json").read_text())
    g_ce, g_dec = ref["grad_norm_ce"], ref["grad_norm_dec"]
    assert g_ce > 0 and g_dec > 0
    assert ref["decorrelation_weight"] == 1.0
    total = float(torch.cat([g.reshape(-1) for g, _ in _grads(steps_zero2 / "0").values()]).norm())
    assert abs(g_ce - g_dec) * (1 - 1e-4) <= total <= (g_ce + g_dec) * (1 + 1e-4)
    assert ref["grad_norm"] == pytest.approx(total, rel=1e-3)      # the engine's own norm (no clipping)
    values = json.loads((steps_zero2 / "1" / "values.json").read_text())
    for k in ("grad_norm_ce", "grad_norm_dec", "loss"):
        assert values[k] == pytest.approx(ref[k], rel=1e-4), (k, values[k], ref[k])
    assert "grad_norm_ce" not in json.loads((steps / "0" / "values.json").read_text())
