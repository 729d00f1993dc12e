"""bench/estimate_lrs3.py counts FLOPs by running the trainer's own LlamaAVSR on the meta device.
Checked here against the model itself: the same model built the trainer's way (build_model, tiny
parts, real weights on the CPU) and run on a real batch under FlopCounterMode gives the same
forward and backward FLOPs and the same prompt; and the paper-size estimate runs on the CPU."""
import importlib.util
import json
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.constants import REPO
from trainer.model.config import TinyModelConfig


def _load():
    spec = importlib.util.spec_from_file_location("estimate_lrs3", REPO / "bench" / "estimate_lrs3.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


est = _load()

TINY = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, audio_rate=3, video_rate=2, projector_hidden=32,
            tiny=TinyModelConfig(whisper_max_source_positions=100), measure_decorrelation_when_off=False,
            llm_attn_implementation="eager")     # what the estimator runs on meta (see its docstring)
VARIANTS = {
    "avsr": dict(modality="avsr"),
    "avsr_decorr": dict(modality="avsr", decorrelation_weight=10.0, decorrelation_impl="torch",
                        prefusion_layernorm=True),
    "asr_natural_length": dict(modality="asr", whisper_pad_to_30s=False),
    "vsr_video_lora": dict(modality="vsr", video_lora=True),
}
TEXT = "place blue at f two now"
FRAMES = 40                                        # 1.6 s: 160 mel frames


def tiny_cfg(**kw):
    from trainer.model.config import ModelConfig

    return ModelConfig(**{**TINY, **kw})


def trainers_model_on_a_real_batch(cfg):
    """The trainer's way: build_model (tiny parts, real weights), its tokenizer, one real clip."""
    from trainer.model.avsr import build_model, build_tokenizer
    from trainer.model.prompt_text import with_transcript_ids

    torch.manual_seed(0)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg, tokenizer=tokenizer)
    g = torch.Generator().manual_seed(1)
    batch = {"keys": ["k0"], "text": [TEXT],
             "audio": torch.randn(1, cfg.tiny.n_mels, 4 * FRAMES, generator=g), "audio_lengths": torch.tensor([4 * FRAMES]),
             "video": torch.randn(1, FRAMES, 88, 88, generator=g), "video_lengths": torch.tensor([FRAMES])}
    return model, with_transcript_ids(tokenizer, batch)


def estimate_for(model, batch):
    """The estimator's count for the same sizes, from the built model's own configs."""
    shape = est.SampleShape(video_frames=FRAMES, instruction_tokens=len(model.instruction_ids),
                            transcript_tokens=len(batch["transcript_ids"][0]))
    return est.count_sample_flops(
        model.cfg, shape, model.base_llm.config,
        model.audio_encoder.encoder.config if model.audio_encoder is not None else None,
        model.video_encoder.cfg if model.video_encoder is not None else None, dtype=torch.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_meta_estimate_equals_the_trainers_model_counted_on_a_real_batch(variant):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch = trainers_model_on_a_real_batch(tiny_cfg(**VARIANTS[variant]))
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    # The encoders' sdpa: FlopCounterMode does not count the CPU flash kernel; the math backend runs
    # the batched matmuls it counts on a GPU (and on meta).
    with sdpa_kernel(SDPBackend.MATH):
        with fwd:
            out = model(batch)
        with bwd:
            out.loss.backward()
    res = estimate_for(model, batch)
    f = res["flops"]
    assert sum(v for k, v in f.items() if k.endswith("_fwd")) == fwd.get_total_flops() > 0
    assert sum(v for k, v in f.items() if k.endswith("_bwd")) == bwd.get_total_flops() > 0
    # the parts that run, and backward only through what trains
    cfg = model.cfg
    assert set(f) == ({"llm_fwd", "llm_bwd", "projectors_fwd", "projectors_bwd"}
                      | ({"whisper_fwd"} if cfg.uses_audio else set())
                      | ({"avhubert_fwd"} if cfg.uses_video else set())
                      | ({"avhubert_bwd"} if cfg.video_lora else set()))
    # and the estimate's token counts are the real prompt's (the model's own assembly)
    from trainer.model.roles import TokenRole

    inputs = model.assemble(batch)
    roles, lay = inputs.token_roles[0], res["layout"]
    assert lay["tokens"] == int(inputs.attention_mask.sum())
    assert lay["audio_tokens"] == int((roles == TokenRole.AUDIO).sum())
    assert lay["video_tokens"] == int((roles == TokenRole.VIDEO).sum())
    assert lay["logit_rows"] == lay["target_tokens"] == int((inputs.labels != -100).sum()) == int(out.num_target_tokens)
    # first principles: 40 frames -> 20 video tokens at rate 2; 160 mel -> 80 Whisper frames -> 27 at rate 3;
    # BOS + a delimited block per stream + instruction + transcript + EOS
    uses_audio, uses_video = model.cfg.uses_audio, model.cfg.uses_video
    assert lay["video_tokens"] == (20 if uses_video else 0) and lay["audio_tokens"] == (27 if uses_audio else 0)
    assert lay["tokens"] == (1 + (20 + 2) * uses_video + (27 + 2) * uses_audio + len(model.instruction_ids)
                             + len(batch["transcript_ids"][0]) + 1)


def test_whisper_runs_its_full_window_when_padding_to_30s():
    def whisper(frames, pad):
        model, batch = trainers_model_on_a_real_batch(tiny_cfg(modality="asr", whisper_pad_to_30s=pad))
        shape = est.SampleShape(video_frames=frames, instruction_tokens=5, transcript_tokens=10)
        return est.count_sample_flops(model.cfg, shape, model.base_llm.config, model.audio_encoder.encoder.config,
                                      dtype=torch.float32)["flops"]["whisper_fwd"]

    # window = 2 x 100 encoder positions = 200 mel frames = 50 video frames
    assert whisper(10, True) == whisper(40, True) > 0
    assert whisper(10, False) < whisper(40, False) < whisper(50, True) * 1.01


def test_video_backward_only_with_video_lora():
    frozen_model, batch = trainers_model_on_a_real_batch(tiny_cfg(modality="vsr"))
    lora_model, _ = trainers_model_on_a_real_batch(tiny_cfg(modality="vsr", video_lora=True))
    frozen, lora = estimate_for(frozen_model, batch), estimate_for(lora_model, batch)
    # the same forward plus the adapters' small matmuls, then its Transformer's backward
    f0, f1 = frozen["flops"], lora["flops"]
    assert 0 < f0["avhubert_fwd"] < f1["avhubert_fwd"] < 1.01 * f0["avhubert_fwd"]
    assert "avhubert_bwd" not in f0 and f1["avhubert_bwd"] > 0
    assert f1["llm_bwd"] == f0["llm_bwd"]
    assert f1["projectors_bwd"] > f0["projectors_bwd"]     # now also the gradient of its input, the encoder's output
    assert lora["params"]["avhubert_lora"] > 0 == frozen["params"]["avhubert_lora"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_mfu_flops_match_the_counted_flops(variant):
    """trainer.engine.flops.StepFlops (the closed form perf/mfu divides by, per step) against the
    counted FLOPs of the real model's forward and backward: equal but for the projectors, which it
    leaves out."""
    model, batch = trainers_model_on_a_real_batch(tiny_cfg(**VARIANTS[variant]))
    res = estimate_for(model, batch)
    f = res["flops"]
    counted = sum(v for k, v in f.items() if not k.startswith("projectors"))
    assert res["trainer_flops"] == pytest.approx(counted, rel=0.01), f
    p = res["params"]
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
    model, batch = trainers_model_on_a_real_batch(tiny_cfg(modality="avsr"))
    shape = est.SampleShape(video_frames=FRAMES, instruction_tokens=5, transcript_tokens=10)
    configs = (model.base_llm.config, model.audio_encoder.encoder.config, model.video_encoder.cfg)
    one = est.measure_activation_bytes(model.cfg, shape, *configs, batch=1)
    four = est.measure_activation_bytes(model.cfg, shape, *configs, batch=4)
    assert one["saved_bytes"] > one["saved_tt_bytes"] > 0
    assert four["saved_bytes"] == pytest.approx(4 * one["saved_bytes"], rel=0.05)


def test_real_sizes_avsr(tmp_path, capsys):
    """Llama-3.2-3B / Whisper medium / AV-HuBERT Large on meta: fast on a CPU, nothing allocated."""
    out = tmp_path / "est.json"
    t0 = time.perf_counter()
    r = est.main(["--json", str(out)])
    assert time.perf_counter() - t0 < 180
    assert json.loads(out.read_text())["flops_run"] == pytest.approx(r["flops_run"])
    assert "TFLOPs/clip: total (counted)" in capsys.readouterr().out
    p, s, f = r["params"], r["sample"], r["flops_per_clip"]
    # first principles, from Llama-3.2-3B's config: embedding V h (tied with the head), per layer
    # q, o (h x h), k, v (h x kv), gate, up, down (h x ffn), two norms; a final norm. LoRA r 48 on q, v.
    c = est.llama32_3b_config()
    h, kv, L, r_ = c.hidden_size, c.num_key_value_heads * c.head_dim, c.num_hidden_layers, 48
    base = c.vocab_size * h + L * (2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size + 2 * h) + h
    assert p["llm_base"] == base and p["llm_lora"] == L * r_ * ((h + h) + (h + kv))
    assert s["whisper_window_frames"] == 1500
    # a matmul costs 2 FLOPs per weight per token forward, about as much again backward (frozen base:
    # activation gradients): the LLM's forward is ~2 N T (attention and the LM head rows come on top)
    d = f["detail"]
    assert d["llm_fwd"] == pytest.approx(2 * (p["llm_base"] - p["llm_embedding"]) * s["tokens"], rel=0.1)
    assert d["llm_bwd"] == pytest.approx(d["llm_fwd"], rel=0.1)
    assert f["total"] == pytest.approx(sum(d.values())) == pytest.approx(
        f["llm"] + f["whisper"] + f["avhubert"] + f["projectors"])
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
