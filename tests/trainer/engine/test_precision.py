"""bf16 as GPUs run it, checked without a model run: which precision a run trains in, which Adam
DeepSpeed builds, one dtype for every trainable parameter, BatchNorm in fp32, and no
host read of a device value between a training forward and its backward. (The loss in fp32:
tests/trainer/engine/test_loss.py.)"""
import dataclasses

import pytest
import torch

from tests.constants import REPO
from trainer.engine.ds_config import (DeepSpeedConfigError, choose_adam, describe_optimizer, load_ds_config,
                                      resolve_ds_config, use_bf16)
from trainer.engine.loss import GlobalCounts, micro_batch_share

COMMON = dict(hidden_size=64, micro_batch_size=8, grad_accum=2, grad_clip=1.0, lr=1e-3, weight_decay=0.01,
              total_steps=100, warmup_steps=10, min_lr_ratio=0.1)


def _raw(name="zero3.json", bf16="auto"):
    raw = load_ds_config(REPO / "ds_configs" / name)
    raw["bf16"]["enabled"] = bf16
    return raw


@pytest.mark.parametrize("precision,written,on_cpu,want", [
    ("auto", "auto", True, False),          # CPU: fp32 unless asked
    ("auto", "auto", False, True),          # a GPU with bf16
    ("bf16", "auto", True, True),           # bf16 on the CPU accelerator, asked for
    ("fp32", "auto", False, False),
    ("auto", True, True, True),             # the JSON's explicit choice decides "auto"
    ("auto", False, False, False),
    ("bf16", True, False, True),            # agreeing explicit values
])
def test_precision_resolution(precision, written, on_cpu, want):
    assert use_bf16(precision, _raw(bf16=written), on_cpu=on_cpu, bf16_supported=True) is want


def test_precision_contradicting_the_json_or_the_gpu_is_one_clear_error():
    with pytest.raises(DeepSpeedConfigError, match=r"--train.precision fp32 .* bf16.enabled=True"):
        use_bf16("fp32", _raw(bf16=True), on_cpu=True, bf16_supported=True)
    with pytest.raises(DeepSpeedConfigError, match="no bf16 support"):
        use_bf16("bf16", _raw(), on_cpu=False, bf16_supported=False)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
@pytest.mark.parametrize("bf16", [False, True])
def test_shipped_configs_resolve_in_both_precisions_on_cpu(name, bf16):
    cfg = resolve_ds_config(_raw(name), **COMMON, bf16=bf16, on_cpu=True)
    assert cfg["bf16"]["enabled"] is bf16
    offload = "offload_optimizer" in cfg["zero_optimization"]
    assert cfg["optimizer"]["params"].get("torch_adam", False) is (not offload)
    assert "fused" not in cfg["optimizer"]["params"]


def test_on_a_gpu_nothing_compiles_unless_the_op_is_prebuilt_or_asked_for():
    gpu = resolve_ds_config(_raw(), **COMMON, bf16=True, on_cpu=False)
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    assert describe_optimizer(gpu) == "torch.optim.AdamW (fused): no compiled op"
    prebuilt = resolve_ds_config(_raw(), **COMMON, bf16=True, on_cpu=False, fused_adam_prebuilt=True)
    assert "torch_adam" not in prebuilt["optimizer"]["params"]
    assert describe_optimizer(prebuilt).startswith("DeepSpeed FusedAdam")
    asked = _raw()
    asked["optimizer"]["params"]["torch_adam"] = False          # the user wants DeepSpeed's FusedAdam
    cfg = {"optimizer": asked["optimizer"]}
    choose_adam(cfg, on_cpu=False, fused_adam_prebuilt=False)
    assert cfg["optimizer"]["params"]["torch_adam"] is False and "fused" not in cfg["optimizer"]["params"]
    offload = resolve_ds_config(_raw("zero3_offload.json"), **COMMON, bf16=True, on_cpu=False)
    assert describe_optimizer(offload).startswith("DeepSpeed CPU Adam")


def test_an_explicit_bf16_in_the_json_that_the_run_does_not_use_is_refused():
    with pytest.raises(DeepSpeedConfigError, match="bf16.enabled=True"):
        resolve_ds_config(_raw(bf16=True), **COMMON, bf16=False, on_cpu=True)


def _tiny_cfg(**kw):
    from trainer.model.config import ModelConfig, TinyModelConfig
    return ModelConfig(**{"lora_r": 4, "lora_alpha": 8, "audio_rate": 3, "video_rate": 2, "projector_hidden": 32,
                          "tiny": TinyModelConfig(whisper_max_source_positions=100), **kw})


def test_every_trainable_parameter_takes_the_training_dtype():
    from trainer.model.avsr import build_model, training_dtype

    ds = {"bf16": {"enabled": True}}
    assert training_dtype(ds) is torch.bfloat16 and training_dtype(None) is torch.float32
    model = build_model(_tiny_cfg(modality="avsr", video_lora=True, prefusion_layernorm=True), ds_config=ds)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("projector" in n for n in trainable)
    assert set(trainable.values()) == {torch.bfloat16}, trainable   # peft alone leaves LoRA in fp32
    model32 = build_model(_tiny_cfg(modality="asr"))
    assert {p.dtype for p in model32.parameters() if p.requires_grad} == {torch.float32}


def test_batchnorm_runs_in_fp32_against_bf16_weights_and_fp32_statistics():
    """ZeRO-2 under bf16 casts parameters, not buffers: the front end meets bf16 activations with
    fp32 running statistics. It normalises in fp32 and returns the input's dtype."""
    from trainer.model.avhubert import BatchNorm2d

    torch.manual_seed(0)
    ref, bn = torch.nn.BatchNorm2d(8).eval(), BatchNorm2d(8).eval()
    for m in (ref, bn):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2)
        m.weight.data.normal_()
        m.bias.data.normal_()
    bn.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(bn(x), ref(x), rtol=0, atol=0)
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()   # buffers stay fp32
    y = bn(x.bfloat16())
    assert y.dtype is torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), rtol=2e-2, atol=5e-2)
    bn.train()                                       # training mode: the fp32 statistics are updated in place
    before = bn.running_mean.clone()
    bn(x.bfloat16())
    assert not torch.equal(before, bn.running_mean) and bn.running_mean.dtype is torch.float32


def test_no_host_read_between_forward_and_backward():
    """The training forward, the loss share and the backward on PyTorch's meta device, where a tensor
    has no values: any .item(), .tolist(), bool() or int() of a device tensor on that path raises
    here, as it would stall a GPU's queue. The batch's lengths stay on the host (batch_to_device)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("estimate_lrs3", REPO / "bench" / "estimate_lrs3.py")
    est = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, est)
    spec.loader.exec_module(est)
    from transformers import LlamaConfig, WhisperConfig

    from trainer.model.avhubert import AVHubertConfig
    from trainer.model.avsr import batch_to_device

    cfg = _tiny_cfg(modality="avsr", decorrelation_weight=10.0, llm_attn_implementation="eager")
    llm = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    whisper = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                            encoder_ffn_dim=64, max_source_positions=100)
    avhubert = AVHubertConfig(layers=1, width=32, heads=2, ffn=64, resnet_channels=4, conv_pos=4, conv_pos_groups=2)
    model = est.model_on_meta(cfg, llm, whisper, avhubert, instruction_tokens=5, dtype=torch.bfloat16)
    shape = est.SampleShape(video_frames=20, instruction_tokens=5, transcript_tokens=7)
    host = est.sample_batch(cfg, shape, 2, "cpu", torch.bfloat16, n_mels=80)
    batch = batch_to_device(host, torch.device("meta"))
    assert batch["video"].is_meta and not batch["video_lengths"].is_meta
    expected = model.token_counts(batch)
    out = model(batch)
    loss, share = micro_batch_share(out, GlobalCounts(targets=2 * expected[0], prefix=2 * expected[1]), expected)
    loss.backward()
    assert loss.is_meta and share.is_meta
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
