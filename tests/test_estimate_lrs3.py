"""bench/estimate_lrs3.py: FLOPs counted on meta for tiny configs against closed forms, and the
real-size estimate for the LRS3 recipes (all on CPU, no weights allocated, nothing downloaded)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("estimate_lrs3", REPO / "bench" / "estimate_lrs3.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


est = _load()


def tiny_model_cfg(modality="avsr", attn="sdpa", **kw):
    from trainer.model.config import ModelConfig

    return ModelConfig(modality=modality, llm_attn_implementation=attn, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                       audio_rate=3, video_rate=2, projector_hidden=32, **kw)


def tiny_llama(tie=True):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=tie)


def tiny_whisper():
    from transformers import WhisperConfig

    # window = 2 x 100 = 200 mel frames (2 s)
    return WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                         encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                         max_source_positions=100)


def tiny_avhubert():
    from trainer.model.avhubert import AVHubertConfig

    return AVHubertConfig(layers=1, width=32, heads=2, ffn=64, resnet_channels=4, conv_pos=16, conv_pos_groups=4)


SHAPE = est.SampleShape(video_frames=40, instruction_tokens=5, transcript_tokens=10)   # 1.6 s


def llm_matmul_params(llm_config) -> int:
    """Non-embedding matmul weights of the decoder (q, k, v, o, gate, up, down)."""
    h, kv = llm_config.hidden_size, llm_config.num_key_value_heads * (llm_config.hidden_size
                                                                      // llm_config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * llm_config.intermediate_size
    return per_layer * llm_config.num_hidden_layers


def test_layout_matches_prompt_rules():
    lay = est.sequence_layout(tiny_model_cfg(), SHAPE)
    assert lay["video_tokens"] == math.ceil(40 / 2) and lay["audio_tokens"] == math.ceil(80 / 3)
    # BOS + 2 blocks with 2 delimiters each + instruction + transcript + EOS
    assert lay["tokens"] == 1 + (20 + 2) + (27 + 2) + 5 + 10 + 1
    assert lay["target_tokens"] == 10 + 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("logits", ["targets", "all"])
def test_llm_forward_flops_match_2N_per_token(attn, logits):
    cfg, llm = tiny_model_cfg(attn=attn), tiny_llama()
    res = est.count_sample_flops(cfg, SHAPE, llm, tiny_whisper(), tiny_avhubert(), logits=logits)
    T, rows = res["layout"]["tokens"], res["logit_rows"]
    assert rows == (11 if logits == "targets" else T - 1)
    lm_head = llm.vocab_size * llm.hidden_size
    approx = 2 * llm_matmul_params(llm) * T + 2 * lm_head * rows
    counted = res["flops"]["llm_fwd"]
    assert counted == pytest.approx(approx, rel=0.15)
    # and closely, once attention (QK^T and AV: 4 T^2 h per layer) and the LoRA branches are added
    attention = 4 * T * T * llm.hidden_size * llm.num_hidden_layers
    kv = llm.num_key_value_heads * llm.hidden_size // llm.num_attention_heads
    lora = 2 * T * cfg.lora_r * ((llm.hidden_size + llm.hidden_size) + (llm.hidden_size + kv)) * llm.num_hidden_layers
    assert counted == pytest.approx(approx + attention + lora, rel=0.02)
    # frozen base: the backward computes activation gradients only, about one forward
    assert 0.9 < res["flops"]["llm_bwd"] / counted < 1.3


def test_whisper_runs_its_full_window_when_padding_to_30s():
    def whisper(frames, pad):
        shape = est.SampleShape(video_frames=frames, instruction_tokens=5, transcript_tokens=10)
        cfg = tiny_model_cfg(modality="asr", whisper_pad_to_30s=pad)
        return est.count_sample_flops(cfg, shape, tiny_llama(), tiny_whisper())["flops"]["whisper_fwd"]

    assert whisper(10, True) == whisper(40, True) > 0               # always the 200-frame window
    assert whisper(10, False) < whisper(40, False) < whisper(50, True) * 1.01


def test_avhubert_forward_only_when_frozen_and_backward_with_video_lora():
    frozen = est.count_sample_flops(tiny_model_cfg(modality="vsr"), SHAPE, tiny_llama(), None, tiny_avhubert())
    assert frozen["flops"]["avhubert_fwd"] > 0 and "avhubert_bwd" not in frozen["flops"]
    lora = est.count_sample_flops(tiny_model_cfg(modality="vsr", video_lora=True), SHAPE, tiny_llama(), None,
                                  tiny_avhubert())
    assert lora["flops"]["avhubert_bwd"] > 0
    assert lora["params"]["avhubert_lora"] > 0 and lora["params"]["trainable"] > frozen["params"]["trainable"]
    # the ResNet front end scales with frames
    half = est.SampleShape(video_frames=20, instruction_tokens=5, transcript_tokens=10)
    small = est.count_sample_flops(tiny_model_cfg(modality="vsr"), half, tiny_llama(), None, tiny_avhubert())
    assert small["flops"]["avhubert_fwd"] == pytest.approx(frozen["flops"]["avhubert_fwd"] / 2, rel=0.1)


@pytest.mark.parametrize("modality, extra", [
    ("avsr", {}), ("asr", {"whisper_pad_to_30s": False}), ("vsr", {"video_lora": True}), ("avsr", {"attn": "eager"}),
])
def test_trainer_mfu_flops_match_the_counted_flops(modality, extra):
    """trainer.engine.flops.StepFlops (what perf/mfu divides by) against FlopCounterMode on the real
    modules, forward and backward: equal up to the projectors, which it leaves out."""
    extra = dict(extra)
    attn = extra.pop("attn", "sdpa")
    cfg = tiny_model_cfg(modality=modality, attn=attn, **extra)
    res = est.count_sample_flops(cfg, SHAPE, tiny_llama(), tiny_whisper() if cfg.uses_audio else None,
                                 tiny_avhubert() if cfg.uses_video else None)
    f = res["flops"]
    counted = sum(v for k, v in f.items() if not k.startswith("projectors"))
    assert res["trainer_flops"] == pytest.approx(counted, rel=0.01), f
    # and the parameter counts the trainer logs
    p = res["params"]
    assert p["trainer_llm"] == p["llm_total"]
    assert p["trainable"] == p["llm_lora"] + p["projectors"] + p["delimiters"] + p["avhubert_lora"]


def test_step_flops_sum_over_a_padded_batch():
    from trainer.engine.flops import Quadratic, StepFlops

    sf = StepFlops(llm_matmul_params=10, llm_layers=2, llm_attn_width=4, lm_head_params=3,
                   audio=Quadratic(c0=100.0), video=Quadratic(c1=2.0, c2=1.0))
    got = sf([5, 3], 4, audio_lengths=[40, 24], video_lengths=[10, 6])
    llm = 4 * 10 * 8 + 12 * 2 * 4 * (25 + 9) + 4 * 3 * 4
    assert got == llm + 2 * 100.0 + (2 * 10 + 100) + (2 * 6 + 36)
    fit = Quadratic.fit(lambda n: 3.0 * n + 0.5 * n * n)
    assert fit(7) == pytest.approx(3.0 * 7 + 0.5 * 49)


def test_activation_bytes_grow_with_the_micro_batch():
    one = est.measure_activation_bytes(tiny_model_cfg(), SHAPE, tiny_llama(), tiny_whisper(), tiny_avhubert(), 1)
    four = est.measure_activation_bytes(tiny_model_cfg(), SHAPE, tiny_llama(), tiny_whisper(), tiny_avhubert(), 4)
    assert one["saved_bytes"] > 0
    assert four["saved_bytes"] == pytest.approx(4 * one["saved_bytes"], rel=0.05)


def test_real_sizes_avsr(tmp_path, capsys):
    """The real Llama-3.2-3B / Whisper medium / AV-HuBERT Large estimate (~10 s on CPU)."""
    out = tmp_path / "est.json"
    r = est.main(["--json", str(out)])
    assert json.loads(out.read_text())["flops_run"] == pytest.approx(r["flops_run"])
    assert "TFLOPs/clip: total (counted)" in capsys.readouterr().out
    p = r["params"]
    assert p["llm_total"] == pytest.approx(3.21e9 + 13.8e6 + 5 * 3072, rel=0.01)   # Llama-3.2-3B + LoRA
    assert p["whisper_encoder"] == pytest.approx(307e6, rel=0.01)
    assert p["avhubert"] == pytest.approx(325e6, rel=0.01)
    s = r["sample"]
    assert s["whisper_window_frames"] == 1500
    assert s["video_tokens"] == math.ceil(s["video_frames"] / 2) and s["audio_tokens"] == math.ceil(s["whisper_frames"] / 3)
    f = r["flops_per_clip"]
    assert f["llm"] == pytest.approx(4 * (p["llm_base"] - p["llm_embedding"]) * s["tokens"], rel=0.1)
    assert f["total"] == pytest.approx(f["llm"] + f["whisper"] + f["avhubert"] + f["projectors"])
    assert r["flops_run"] == pytest.approx(f["total"] * 150_000 * 10)
    assert r["time"]["gpu_hours"] == pytest.approx(r["flops_run"] / (0.35 * 989e12) / 3600)
    assert r["steps"]["clips_per_micro_batch"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lrs3_asr.yaml", "lrs3_vsr.yaml"])
def test_real_sizes_other_recipes(recipe):
    r = est.main(["--recipe", str(REPO / "launch" / "recipes" / recipe), "--measured-samples-per-s", "100"])
    f = r["flops_per_clip"]
    if recipe == "lrs3_asr.yaml":
        assert f["avhubert"] == 0 and f["whisper"] > 0
    else:
        assert f["whisper"] == 0 and f["detail"]["avhubert_bwd"] > 0       # video LoRA in the VSR recipe
    assert r["time"]["assumption"] == "measured"
    assert r["time"]["gpu_hours"] == pytest.approx(150_000 * 10 / (100 / 8) / 3600)
