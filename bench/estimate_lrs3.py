"""Hardware and time estimate for the LRS3 recipes, from FLOPs counted on the real model.

The trainer's own model (trainer.model.avsr.LlamaAVSR, put together by `assemble_model` with the
recipe's LoRA, freezing, projectors and delimiter table) is built on PyTorch's `meta` device from
configs at the paper's sizes written below (shapes only: no weights allocated, nothing downloaded):

  LLM        transformers LlamaForCausalLM, Llama-3.2-3B architecture, vocabulary resized for the
             five added tokens.
  Whisper    transformers WhisperEncoder, medium size, in the project's WhisperAudioEncoder.
  AV-HuBERT  the project's AVHubertVideoEncoder with AVHubertConfig.large().

One training micro-batch of average LRS3 clips then runs through LlamaAVSR.forward and the loss's
backward under `torch.utils.flop_counter.FlopCounterMode`: the model's own prompt assembly, encoders
(frozen ones under no_grad), LM head on the target rows, decorrelation loss; the backward is
autograd's (frozen base: activation gradients, plus the LoRA and projector weight gradients). So
the estimate follows the model: nothing here mirrors its forward.

FlopCounterMode counts matmuls, convolutions and attention; it ignores elementwise ops (norms,
activations, softmax, RoPE, the decorrelation loss's products), a few percent at most. Attention is
counted dense (T x T, causal half not discounted). The LLM runs with eager attention here: on meta,
transformers' sdpa mask check reads mask values, which meta tensors do not have; eager attention is
the same two batched matmuls that FlopCounterMode counts for sdpa.

The sample: an average clip (corpus hours / clips), its transcript at the LRS3 speech rate; the
instruction's token count is estimated without the Llama-3 tokenizer unless --tokenizer is given.
Token counts (LLM sequence, per stream) are read from the shapes of the real run.

    python bench/estimate_lrs3.py                                          # lrs3_avsr.yaml, 8 GPUs
    python bench/estimate_lrs3.py --recipe launch/recipes/lrs3_asr.yaml --gpus 16 --json est.json
    python bench/estimate_lrs3.py --measured-samples-per-s 95 --measured-gpus 8   # MLflow perf/samples_per_s

Everything below the FLOP count is an ESTIMATE: the corpus figures are approximate, and without a
measured throughput the time rests on the assumed MFU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.data.config import DataConfig  # noqa: E402
from trainer.data.features import MELS_PER_FRAME  # noqa: E402
from trainer.data.shard_format import FPS  # noqa: E402
from trainer.model.audio_encoder import whisper_output_lengths  # noqa: E402
from trainer.model.avhubert import AVHubertConfig  # noqa: E402
from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.prompt import INSTRUCTIONS  # noqa: E402
from trainer.model.prompt_text import PromptIds  # noqa: E402
from trainer.model.tokenizer import SpecialTokenIds  # noqa: E402

DEFAULT_RECIPE = REPO / "launch" / "recipes" / "lrs3_avsr.yaml"

# LRS3 (Afouras et al. 2018, "LRS3-TED"; the same figures are used by auto_avsr): pretrain + trainval
# = about 433 h in about 150k clips. Approximate: the exact count depends on how the auto_avsr
# preparation segments the long pretrain utterances and on what the pipeline filters (max_clip_frames).
LRS3_TRAIN_HOURS = 433.0
LRS3_TRAIN_CLIPS = 150_000
# LRS3 speech rate (TED talks): ~2.6 words/s; ~1.3 Llama-3 tokens per English word.
WORDS_PER_S = 2.6
TOKENS_PER_WORD = 1.3

CROP = DataConfig().crop_size   # AV-HuBERT's mouth crop, as the pipeline cuts it

# The trainer resizes Llama-3's tables for the tokens it adds: <pad> (Llama 3 has none) and the four
# modality delimiters (trainer.model.tokenizer.add_avsr_special_tokens), with these ids.
LLAMA3_VOCAB = 128_256
LLAMA3_ADDED_TOKENS = 5
LLAMA3_SPECIALS = SpecialTokenIds(bos=128000, eos=128001, pad=128256, audio_start=128257, audio_end=128258,
                                  video_start=128259, video_end=128260)


# ----------------------------------------------------------------------------- architectures (data)

def llama32_3b_config(vocab_size: int = LLAMA3_VOCAB + LLAMA3_ADDED_TOKENS):
    """meta-llama/Llama-3.2-3B's config.json, written out (nothing is downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )


def llama32_1b_config(vocab_size: int = LLAMA3_VOCAB + LLAMA3_ADDED_TOKENS):
    """meta-llama/Llama-3.2-1B's config.json, written out (bench/bench_trainer.py uses it)."""
    cfg = llama32_3b_config(vocab_size)
    for key, value in dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64).items():
        setattr(cfg, key, value)
    return cfg


def whisper_medium_config(n_mels: int = 80):
    """openai/whisper-medium(.en) sizes; only the encoder is built."""
    from transformers import WhisperConfig

    return WhisperConfig(num_mel_bins=n_mels, d_model=1024, encoder_layers=24, encoder_attention_heads=16,
                         encoder_ffn_dim=4096, decoder_layers=24, decoder_attention_heads=16,
                         decoder_ffn_dim=4096, max_source_positions=1500, max_target_positions=448)


def estimate_instruction_tokens(text: str) -> int:
    """Llama-3 token count of an instruction, estimated without the tokenizer: one token per word or
    punctuation mark, two for words over 8 letters ("Transcribe" -> "Trans" "cribe").
    "Transcribe speech and video to text." -> 8. Use --tokenizer or --instruction-tokens to override."""
    pieces = re.findall(r"\w+|[^\w\s]", text)
    return sum(2 if len(p) > 8 else 1 for p in pieces)


# ----------------------------------------------------------------------------- the sample

@dataclass
class SampleShape:
    """One training clip as the data pipeline hands it to the model."""
    video_frames: int
    """25 fps frames (also fixes the audio length: 4 mel frames per video frame)."""
    instruction_tokens: int
    transcript_tokens: int

    @property
    def mel_frames(self) -> int:
        return MELS_PER_FRAME * self.video_frames

    @classmethod
    def from_duration(cls, seconds: float, instruction_tokens: int, words_per_s: float = WORDS_PER_S,
                      tokens_per_word: float = TOKENS_PER_WORD) -> "SampleShape":
        return cls(video_frames=max(2, round(FPS * seconds)), instruction_tokens=instruction_tokens,
                   transcript_tokens=max(1, round(seconds * words_per_s * tokens_per_word)))


def sample_batch(cfg: ModelConfig, shape: SampleShape, batch: int, device, dtype, n_mels: int = 80) -> dict:
    """A batch of `batch` identical clips as the model takes it: data on `device`, lengths on the CPU
    (the prompt layout reads them; on meta only shapes exist), transcripts as token ids."""
    out = {"transcript_ids": [[0] * shape.transcript_tokens for _ in range(batch)]}
    if cfg.uses_audio:
        out["audio"] = torch.zeros(batch, n_mels, shape.mel_frames, device=device, dtype=dtype)
        out["audio_lengths"] = torch.full((batch,), shape.mel_frames)
    if cfg.uses_video:
        out["video"] = torch.zeros(batch, shape.video_frames, CROP, CROP, device=device, dtype=dtype)
        out["video_lengths"] = torch.full((batch,), shape.video_frames)
    return out


# ----------------------------------------------------------------------------- the model on meta

def build_model_from_configs(cfg: ModelConfig, llm_config, whisper_config=None,
                             avhubert_config: AVHubertConfig | None = None, *, instruction_tokens: int,
                             specials: SpecialTokenIds = LLAMA3_SPECIALS, dtype: torch.dtype = torch.bfloat16,
                             device: str | torch.device = "meta", attn_implementation: str | None = None):
    """The trainer's LlamaAVSR (trainer.model.avsr.assemble_model) on `device` with parts of the given
    sizes, randomly initialised (on meta: not at all), cast to `dtype` as DeepSpeed's bf16 mode does.
    attn_implementation: the LLM's attention (default: the recipe's; meta needs "eager")."""
    from transformers import LlamaForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from trainer.model.audio_encoder import WhisperAudioEncoder
    from trainer.model.avhubert import AVHubertVideoEncoder
    from trainer.model.avsr import assemble_model

    if cfg.uses_audio and whisper_config is None:
        raise ValueError(f"modality {cfg.modality!r} needs a Whisper config")
    if cfg.uses_video and avhubert_config is None:
        raise ValueError(f"modality {cfg.modality!r} needs an AV-HuBERT config")
    prompt = PromptIds(specials, tuple([0] * instruction_tokens))
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(llm_config, attn_implementation=attn_implementation
                                            or cfg.llm_attn_implementation).requires_grad_(False)
        audio = video = None
        if cfg.uses_audio:
            audio = WhisperAudioEncoder(WhisperEncoder(whisper_config).requires_grad_(False).eval(),
                                        pad_to_window=cfg.whisper_pad_to_30s)
        if cfg.uses_video:
            video = AVHubertVideoEncoder(avhubert_config)
        model = assemble_model(cfg, prompt, llm, audio, video)
    return model.to(device=device, dtype=dtype)


def model_on_meta(cfg: ModelConfig, llm_config, whisper_config=None, avhubert_config=None, *,
                  instruction_tokens: int, dtype: torch.dtype = torch.bfloat16):
    # The decorrelation loss in plain torch: the Triton kernel cannot run on meta (FlopCounterMode
    # would not see inside it either; both are elementwise work, which it does not count).
    cfg = dataclasses.replace(cfg, decorrelation_impl="torch")
    return build_model_from_configs(cfg, llm_config, whisper_config, avhubert_config,
                                    instruction_tokens=instruction_tokens, dtype=dtype, device="meta",
                                    attn_implementation="eager")


def parameter_counts(model) -> dict[str, int]:
    counts = {"llm_total": 0, "llm_base": 0, "llm_embedding": 0, "llm_lora": 0, "whisper_encoder": 0,
              "avhubert": 0, "avhubert_lora": 0, "projectors": 0, "delimiters": 0, "trainable": 0,
              "total": 0}
    embedding = model.base_llm.get_input_embeddings().weight
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        counts["trainable"] += n if p.requires_grad else 0
        if name.startswith("llm."):
            counts["llm_total"] += n
            counts["llm_lora" if "lora_" in name else "llm_base"] += n
            counts["llm_embedding"] += n if p is embedding else 0
        elif name.startswith("audio_encoder."):
            counts["whisper_encoder"] += n
        elif name.startswith("video_encoder."):
            counts["avhubert_lora" if "lora_" in name else "avhubert"] += n
        elif "projector" in name:
            counts["projectors"] += n
        elif name.startswith("delimiter_embeddings"):
            counts["delimiters"] += n
    return counts


# ----------------------------------------------------------------------------- counting

class _SavedBytes:
    """Bytes of the tensors autograd saves for backward (activation memory), weights excluded,
    each storage counted once. `tt_bytes`: the [.., T, T] attention tensors among them, which the
    eager/math attention path keeps but sdpa's flash / memory-efficient kernels on a GPU do not."""

    def __init__(self, params, seq_len: int):
        self.skip = {p.untyped_storage()._cdata for p in params}
        self.seq_len = seq_len
        self.seen: dict[int, int] = {}
        self.tt_bytes = 0
        self.keep = []

    def pack(self, t: torch.Tensor):
        self.keep.append(t)
        key = t.untyped_storage()._cdata
        if key not in self.skip and key not in self.seen:
            nbytes = t.untyped_storage().nbytes()
            self.seen[key] = nbytes
            if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.seq_len:
                self.tt_bytes += nbytes
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


PARTS = {"audio_encoder": "whisper", "video_encoder": "avhubert", "audio_projector": "projectors",
         "video_projector": "projectors"}


def _forward_by_part(mode: FlopCounterMode, model) -> dict[str, float]:
    """FlopCounterMode's per-module forward counts -> whisper / avhubert / projectors, and llm: the
    rest (decoder, LM head, losses)."""
    root = type(model).__name__
    by_module = {k: sum(v.values()) for k, v in mode.get_flop_counts().items()}
    parts = {"whisper": 0.0, "avhubert": 0.0, "projectors": 0.0}
    for child, part in PARTS.items():
        parts[part] += by_module.get(f"{root}.{child}", 0)
    parts["llm"] = mode.get_total_flops() - sum(parts.values())
    return parts


def _counted(fn) -> float:
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return float(mode.get_total_flops())


def _backward_by_part(loss: torch.Tensor, model, seen: dict) -> dict[str, float]:
    """The loss's backward in three autograd calls on the real graph, counted apart (the counter's
    module tracking cannot split a backward: a module whose inputs need no gradient, like a
    projector fed by a frozen encoder, never closes): the LLM down to its input embeddings (with
    the LoRA weight gradients), then the prompt's trainable inputs (projectors, delimiter table),
    then the video encoder when it trains. Together: the ops of loss.backward()."""
    embeds, video = seen["inputs_embeds"], seen.get("video_frames")
    video = video if video is not None and video.requires_grad else None
    lora = [p for p in model.llm.parameters() if p.requires_grad]
    prompt_inputs = [p for name, p in model.named_parameters()
                     if p.requires_grad and not name.startswith(("llm.", "video_encoder."))]
    grads: dict[str, tuple] = {}
    flops = {"llm_bwd": _counted(lambda: grads.update(llm=torch.autograd.grad(loss, [embeds] + lora)))}
    targets = prompt_inputs + ([video] if video is not None else [])
    flops["projectors_bwd"] = _counted(
        lambda: grads.update(prompt=torch.autograd.grad(embeds, targets, grads["llm"][0])))
    if video is not None:
        flops["avhubert_bwd"] = _counted(lambda: torch.autograd.grad(
            video, [p for p in model.video_encoder.parameters() if p.requires_grad], grads["prompt"][-1]))
    return flops


def _shapes(model, saved: "_SavedBytes | None" = None) -> tuple[dict, list]:
    """Hooks recording the real run's token counts: the decoder's sequence length (also the T x T
    test of `saved`), each projector's tokens per clip, the LM head's rows."""
    seen: dict[str, int] = {}

    def decoder(_mod, _args, kwargs):
        seen["inputs_embeds"] = kwargs["inputs_embeds"]
        seen["tokens"] = kwargs["inputs_embeds"].shape[1]
        if saved is not None:
            saved.seq_len = seen["tokens"]

    def projector(name):
        def hook(_mod, _args, out):
            seen[f"{name}_tokens"] = out[0].shape[1]
        return hook

    def head(_mod, args, _out):
        seen["logit_rows"] = args[0].shape[0]

    def video_encoder(_mod, _args, out):
        seen["video_frames"] = out[0]

    handles = [model.decoder.register_forward_pre_hook(decoder, with_kwargs=True),
               model.base_llm.get_output_embeddings().register_forward_hook(head)]
    if model.video_encoder is not None:
        handles.append(model.video_encoder.register_forward_hook(video_encoder))
    for name in ("audio", "video"):
        proj = getattr(model, f"{name}_projector")
        if proj is not None:
            handles.append(proj.register_forward_hook(projector(name)))
    return seen, handles


def count_step(model, batch: dict, *, backward: bool = True, measure_memory: bool = False) -> dict:
    """LlamaAVSR.forward (and the loss's backward) on `batch` under FlopCounterMode.
    -> {"flops": {part_fwd, part_bwd for llm, whisper, avhubert, projectors (parts that run)}, "layout":
    token counts of the run, per clip, and with measure_memory the bytes autograd saved}."""
    saved = _SavedBytes(list(model.parameters()), seq_len=0) if measure_memory else None
    seen, handles = _shapes(model, saved)
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack) if saved else nullcontext()
    fwd = FlopCounterMode(display=False)
    model.train()
    try:
        with hooks, fwd:
            out = model(batch)
    finally:
        for h in handles:
            h.remove()
    flops = {f"{part}_fwd": n for part, n in _forward_by_part(fwd, model).items() if n}
    if backward:
        flops.update({k: n for k, n in _backward_by_part(out.loss, model, seen).items() if n})
    clips = len(batch["transcript_ids"])
    layout = {"tokens": seen["tokens"], "audio_tokens": seen.get("audio_tokens", 0),
              "video_tokens": seen.get("video_tokens", 0), "logit_rows": seen["logit_rows"] // clips}
    result = {"flops": {k: v / clips for k, v in flops.items()}, "layout": layout}
    if saved is not None:
        result["saved_bytes"], result["saved_tt_bytes"] = saved.total, saved.tt_bytes
    return result


def count_sample_flops(cfg: ModelConfig, shape: SampleShape, llm_config, whisper_config=None,
                       avhubert_config: AVHubertConfig | None = None, *, dtype: torch.dtype = torch.bfloat16) -> dict:
    """FLOPs of one training clip, counted on meta; any sizes (tests pass tiny configs). Also the
    parameter counts, and what the trainer's perf/mfu counts for the clip (trainer.engine.flops.StepFlops)."""
    from trainer.engine.flops import StepFlops

    model = model_on_meta(cfg, llm_config, whisper_config, avhubert_config,
                          instruction_tokens=shape.instruction_tokens, dtype=dtype)
    n_mels = whisper_config.num_mel_bins if whisper_config is not None else 80
    batch = sample_batch(cfg, shape, 1, "meta", dtype, n_mels)
    res = count_step(model, batch)
    res["params"] = parameter_counts(model)
    res["layout"].update(instruction_tokens=shape.instruction_tokens, transcript_tokens=shape.transcript_tokens)
    targets, _ = model.token_counts(batch)
    res["layout"]["target_tokens"] = targets
    res["trainer_flops"] = StepFlops.from_model(model, CROP)(
        [res["layout"]["tokens"]], targets,
        audio_lengths=[shape.mel_frames] if cfg.uses_audio else (),
        video_lengths=[shape.video_frames] if cfg.uses_video else ())
    return res


def measure_activation_bytes(cfg: ModelConfig, shape: SampleShape, llm_config, whisper_config=None,
                             avhubert_config: AVHubertConfig | None = None, batch: int = 1) -> dict:
    """Bytes autograd saves for one micro-batch of `batch` clips (forward only, on meta)."""
    model = model_on_meta(cfg, llm_config, whisper_config, avhubert_config,
                          instruction_tokens=shape.instruction_tokens)
    n_mels = whisper_config.num_mel_bins if whisper_config is not None else 80
    res = count_step(model, sample_batch(cfg, shape, batch, "meta", torch.bfloat16, n_mels),
                     backward=False, measure_memory=True)
    return {"saved_bytes": res["saved_bytes"], "saved_tt_bytes": res["saved_tt_bytes"]}


# ----------------------------------------------------------------------------- the estimate

def clips_per_micro_batch(data_cfg, mean_frames: float) -> int:
    """The trainer's own estimate (trainer.data.pipeline.train_batches_per_epoch)."""
    from trainer.data.pipeline import BATCH_SIZE_SLACK

    per = int(data_cfg.max_frames_per_batch / (BATCH_SIZE_SLACK * mean_frames))
    return max(1, min(data_cfg.max_batch_size, per))


def estimate(args: argparse.Namespace) -> dict:
    from trainer.config import load_recipe

    t0 = time.perf_counter()
    exp = load_recipe(args.recipe, config=str(REPO / "ds_configs" / "zero3.json"))
    cfg = exp.model
    instr_text = INSTRUCTIONS[cfg.modality]
    if args.instruction_tokens is not None:
        instr, instr_source = args.instruction_tokens, "--instruction-tokens"
    elif args.tokenizer:
        from trainer.model.avsr import build_tokenizer
        from trainer.model.prompt_text import prompt_ids

        tokenizer = build_tokenizer(dataclasses.replace(cfg, tokenizer_path=str(args.tokenizer)))
        instr = len(prompt_ids(tokenizer, cfg.modality).instruction)      # as the trainer tokenizes it
        instr_source = f"measured with {args.tokenizer}"
    else:
        instr, instr_source = estimate_instruction_tokens(instr_text), "estimated (no Llama-3 tokenizer offline)"

    clip_s = args.hours * 3600.0 / args.clips
    shape = SampleShape.from_duration(clip_s, instr, args.words_per_s, args.tokens_per_word)
    whisper_frames = int(whisper_output_lengths(torch.tensor(shape.mel_frames)))   # 50 Hz, the clip itself
    llm_config = llama32_3b_config()
    whisper_config = whisper_medium_config() if cfg.uses_audio else None
    av_config = AVHubertConfig.large() if cfg.uses_video else None
    res = count_sample_flops(cfg, shape, llm_config, whisper_config, av_config)
    f, p, lay = res["flops"], res["params"], res["layout"]
    parts = {part: f.get(f"{part}_fwd", 0) + f.get(f"{part}_bwd", 0)
             for part in ("llm", "projectors", "whisper", "avhubert")}
    per_clip = sum(parts.values())
    per_epoch = per_clip * args.clips
    run = per_epoch * args.epochs
    hidden, vocab = llm_config.hidden_size, llm_config.vocab_size
    all_logits_extra = 2 * 2.0 * hidden * vocab * (lay["tokens"] - 1 - lay["logit_rows"])   # fwd + act-bwd

    # ---- time
    peak = args.peak_tflops * 1e12
    mean_frames = FPS * clip_s
    per_mb = clips_per_micro_batch(exp.data, mean_frames)
    steps_per_epoch = math.ceil(math.ceil(args.clips / args.gpus) / per_mb / exp.train.grad_accum)
    recipe_epochs = exp.train.max_steps * per_mb * args.gpus * exp.train.grad_accum / args.clips
    gpu_s_mfu = run / (args.mfu * peak)
    out_time = {"assumption": "mfu", "mfu": args.mfu, "peak_tflops": args.peak_tflops,
                "gpu_hours": gpu_s_mfu / 3600, "wall_hours": gpu_s_mfu / 3600 / args.gpus,
                "sensitivity": {str(m): run / (m * peak) / 3600 for m in (0.1, 0.2, 0.35, 0.5)}}
    if args.measured_samples_per_s:
        mgpus = args.measured_gpus or args.gpus
        per_gpu = args.measured_samples_per_s / mgpus
        gpu_s = args.clips * args.epochs / per_gpu
        out_time.update(assumption="measured", measured_samples_per_s=args.measured_samples_per_s,
                        measured_gpus=mgpus, gpu_hours=gpu_s / 3600, wall_hours=gpu_s / 3600 / args.gpus,
                        implied_mfu=per_gpu * per_clip / peak)

    # ---- memory per GPU (ZeRO-3), estimate
    act = measure_activation_bytes(cfg, shape, llm_config, whisper_config, av_config, batch=per_mb)
    g = args.gpus
    frozen = p["total"] - p["trainable"]
    mem = {
        "clips_per_micro_batch": per_mb,
        "params_bf16_sharded_gb": p["total"] * 2 / g / 1e9,
        "trainable_optimizer_sharded_gb": p["trainable"] * 16 / g / 1e9,     # fp32 master, Adam m and v, grad
        "gathered_params_max_gb": min(1e9, frozen) * 2 / 1e9,                            # stage3_max_live_parameters
        "activations_gb": (act["saved_bytes"] - act["saved_tt_bytes"]) / 1e9,
        "activations_tt_excluded_gb": act["saved_tt_bytes"] / 1e9,
    }
    mem["total_gb"] = (mem["params_bf16_sharded_gb"] + mem["trainable_optimizer_sharded_gb"]
                       + mem["gathered_params_max_gb"] + mem["activations_gb"])

    # ---- ZeRO-3 traffic: every micro-batch all-gathers the bf16 weights it runs (the LLM in forward
    # and again in backward, the frozen encoders in forward; AV-HuBERT in backward too with video LoRA)
    video_bwd = bool(f.get("avhubert_bwd"))
    gathered = 2 * (2 * p["llm_total"] + p["whisper_encoder"] + p["avhubert"] * (2 if video_bwd else 1)
                    + p["avhubert_lora"] + 2 * p["projectors"]) * (g - 1) / g
    mfu = out_time.get("implied_mfu", args.mfu)
    compute_s = per_mb * per_clip / (mfu * peak)
    comm = {"gathered_gb_per_micro_batch": gathered / 1e9, "mfu": mfu, "compute_s_per_micro_batch_at_mfu": compute_s,
            "gather_gbps_to_hide": gathered / compute_s / 1e9}

    return {
        "recipe": str(args.recipe), "modality": cfg.modality, "attn": cfg.llm_attn_implementation,
        "rates": {"audio": cfg.audio_rate if cfg.uses_audio else None,
                  "video": cfg.video_rate if cfg.uses_video else None},
        "corpus": {"hours": args.hours, "clips": args.clips, "mean_clip_s": clip_s,
                   "words_per_s": args.words_per_s, "tokens_per_word": args.tokens_per_word,
                   "source": "LRS3 paper / auto_avsr (pretrain + trainval), approximate"},
        "instruction": {"text": instr_text, "tokens": instr, "source": instr_source},
        "sample": {**asdict(shape), "mel_frames": shape.mel_frames, "whisper_frames": whisper_frames,
                   "whisper_window_frames": 1500 if cfg.whisper_pad_to_30s else whisper_frames, **lay},
        "params": p,
        "flops_per_clip": {**parts, "total": per_clip, "detail": f,
                           "all_position_logits_extra": all_logits_extra},
        "trainer_train_flops_per_clip": res["trainer_flops"],
        "trainer_over_counted": res["trainer_flops"] / per_clip,
        "flops_per_epoch": per_epoch, "epochs": args.epochs, "flops_run": run,
        "steps": {"gpus": g, "clips_per_micro_batch": per_mb, "grad_accum": exp.train.grad_accum,
                  "steps_per_epoch": steps_per_epoch, "recipe_max_steps": exp.train.max_steps,
                  "recipe_max_steps_epochs": recipe_epochs},
        "time": out_time,
        "memory_per_gpu": mem,
        "zero3_communication": comm,
        "seconds_to_estimate": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- report

def _e(x: float) -> str:
    return f"{x:.3g}"


def _t(x: float) -> str:
    return f"{x / 1e12:,.3f}"


def render(r: dict) -> str:
    p, f, s, t, m, st = (r["params"], r["flops_per_clip"], r["sample"], r["time"], r["memory_per_gpu"],
                         r["steps"])
    c = r["zero3_communication"]

    def used(n: float, text: str) -> str:
        return text if n else "not used"

    M = 1e6
    lines = [
        f"## FLOP estimate: {Path(r['recipe']).name} (modality {r['modality']}, "
        f"audio rate {r['rates']['audio']}, video rate {r['rates']['video']})",
        "",
        f"Average clip: {r['corpus']['hours']:.0f} h / {r['corpus']['clips']:,} clips = "
        f"{r['corpus']['mean_clip_s']:.2f} s ({r['corpus']['source']}); {s['video_frames']} video frames"
        + (f", {s['whisper_frames']} Whisper frames (the encoder runs {s['whisper_window_frames']})."
           if r["modality"] != "vsr" else "."),
        f"LLM sequence: {s['tokens']} tokens = 1 BOS + {s['video_tokens']} video + {s['audio_tokens']} audio"
        f" + delimiters + {s['instruction_tokens']} instruction ({r['instruction']['source']})"
        f" + {s['transcript_tokens']} transcript + EOS; logits on {s['logit_rows']} target rows.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| params: LLM (Llama-3.2-3B, resized vocab, incl. LoRA) | {p['llm_total'] / M:,.1f} M |",
        f"| params: trainable (LLM LoRA {p['llm_lora'] / M:.1f} M + projectors {p['projectors'] / M:.1f} M"
        f" + video LoRA {p['avhubert_lora'] / M:.1f} M + delimiters) | {p['trainable'] / M:,.1f} M |",
        f"| params: Whisper medium encoder | {used(p['whisper_encoder'], '%.1f M' % (p['whisper_encoder'] / M))} |",
        f"| params: AV-HuBERT Large (video) | {used(p['avhubert'], '%.1f M' % (p['avhubert'] / M))} |",
        f"| TFLOPs/clip: LLM fwd + bwd ({_t(f['detail'].get('llm_fwd', 0))} + "
        f"{_t(f['detail'].get('llm_bwd', 0))}; decoder, LM head on target rows, losses) | {_t(f['llm'])} |",
        f"| TFLOPs/clip: Whisper encoder fwd ({s['whisper_window_frames']} frames) |"
        f" {used(f['whisper'], _t(f['whisper']))} |",
        f"| TFLOPs/clip: AV-HuBERT fwd{' + bwd (video LoRA)' if f['detail'].get('avhubert_bwd') else ''}"
        f" | {used(f['avhubert'], _t(f['avhubert']))} |",
        f"| TFLOPs/clip: projectors fwd + bwd | {_t(f['projectors'])} |",
        f"| **TFLOPs/clip: total (counted)** | **{_t(f['total'])}** |",
        f"| TFLOPs/clip: what the trainer's perf/mfu counts | {_t(r['trainer_train_flops_per_clip'])} "
        f"({r['trainer_over_counted']:.2f}x counted) |",
        f"| FLOPs/epoch ({r['corpus']['clips']:,} clips) | {_e(r['flops_per_epoch'])} |",
        f"| FLOPs/run ({r['epochs']:g} epochs) | {_e(r['flops_run'])} |",
    ]
    if t["assumption"] == "measured":
        lines += [
            f"| GPU-hours (measured {t['measured_samples_per_s']:g} samples/s on {t['measured_gpus']} GPUs;"
            f" implied MFU {t['implied_mfu']:.2f}) | {t['gpu_hours']:,.1f} |",
        ]
    else:
        lines += [f"| GPU-hours at MFU {t['mfu']:.2f} of {t['peak_tflops']:g} TFLOP/s | {t['gpu_hours']:,.1f} |"]
    lines += [
        f"| wall time on {st['gpus']} GPUs (linear scaling assumed) | {t['wall_hours']:,.2f} h |",
        f"| steps: {st['clips_per_micro_batch']} clips/micro-batch x {st['gpus']} GPUs -> steps/epoch |"
        f" {st['steps_per_epoch']:,} (recipe max_steps {st['recipe_max_steps']:,} = "
        f"{st['recipe_max_steps_epochs']:.1f} epochs) |",
        f"| memory/GPU (ESTIMATE, ZeRO-3, {st['gpus']} GPUs, {m['clips_per_micro_batch']} clips = "
        f"1800-frame bucket) | ~{m['total_gb']:.1f} GB + CUDA context/fragmentation |",
        "",
        f"ZeRO-3 traffic: each GPU all-gathers ~{c['gathered_gb_per_micro_batch']:.1f} GB of bf16 weights per "
        f"micro-batch, which at MFU {c['mfu']:.2f} computes in {c['compute_s_per_micro_batch_at_mfu'] * 1e3:.0f} ms: "
        f"hiding it needs ~{c['gather_gbps_to_hide']:.0f} GB/s of all-gather bandwidth per GPU. For reference, "
        "NVLink inside an H100 node gives a few hundred GB/s, a 400 Gb/s InfiniBand NIC per GPU ~50 GB/s"
        + ("; so between nodes the gathers cannot hide behind compute: multi-node runs are likely "
           "communication-bound and scale worse than linearly." if c["gather_gbps_to_hide"] > 50 else "."),
        "",
        "GPU-hours by MFU (counted FLOPs / (MFU x peak)): " + ", ".join(
            f"{k}: {v:,.1f}" for k, v in t["sensitivity"].items()),
        "",
        f"Memory estimate per GPU: bf16 weights sharded {m['params_bf16_sharded_gb']:.2f} GB (all "
        f"{p['total'] / 1e9:.2f} B params / {st['gpus']}; under ZeRO-3 the frozen Whisper and AV-HuBERT are "
        f"partitioned too, not replicated) + trainable fp32 master/Adam m, v/grad "
        f"{m['trainable_optimizer_sharded_gb']:.2f} GB + gathered layers <= {m['gathered_params_max_gb']:.2f} GB "
        f"(stage3_max_live_parameters 1e9) + saved activations {m['activations_gb']:.2f} GB (measured on meta "
        f"for one micro-batch; {m['activations_tt_excluded_gb']:.2f} GB of T x T attention tensors excluded, "
        "which GPU sdpa kernels do not keep).",
        f"The trainer's perf/mfu counts FLOPs with trainer.engine.flops.StepFlops (closed form for the LLM, "
        f"encoders counted on meta at start-up): {r['trainer_over_counted']:.3f}x the FLOPs counted here "
        "(it leaves out the projectors).",
        f"Logits for all positions (plain LlamaForCausalLM) would add {_t(f['all_position_logits_extra'])} "
        "TFLOPs/clip; the trainer computes them on target rows only.",
        "Not included: evaluation (beam 15 every eval_every steps), sink probes, checkpoints, data loading.",
        f"(estimated in {r['seconds_to_estimate']:.1f} s)",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="recipe YAML (default lrs3_avsr.yaml)")
    p.add_argument("--hours", type=float, default=LRS3_TRAIN_HOURS,
                   help="training hours (LRS3 pretrain + trainval ~433 h; LRS3 paper / auto_avsr, approximate)")
    p.add_argument("--clips", type=int, default=LRS3_TRAIN_CLIPS,
                   help="training clips (~150k; LRS3 paper / auto_avsr, approximate)")
    p.add_argument("--epochs", type=float, default=10.0, help="epochs (Llama-AVSR trains 10)")
    p.add_argument("--words-per-s", type=float, default=WORDS_PER_S, help="LRS3 speech rate (~2.6 words/s)")
    p.add_argument("--tokens-per-word", type=float, default=TOKENS_PER_WORD, help="Llama-3 tokens per word (~1.3)")
    p.add_argument("--instruction-tokens", type=int, default=None, help="override the instruction token count")
    p.add_argument("--tokenizer", default=None, help="local Llama-3 tokenizer folder: measure the instruction")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (default 0.35)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s per GPU (default 989 = H100 SXM)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the wall time (linear scaling assumed)")
    p.add_argument("--measured-samples-per-s", type=float, default=None,
                   help="perf/samples_per_s from MLflow (all GPUs together): replaces the MFU assumption")
    p.add_argument("--measured-gpus", type=int, default=None,
                   help="GPUs the measured samples/s was taken on (default: --gpus)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = estimate(args)
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
