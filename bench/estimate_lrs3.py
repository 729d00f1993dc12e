"""Hardware and time estimate for the LRS3 recipes, from FLOPs counted on the real modules.

One training sample (an average LRS3 clip) is run through the real modules at their real sizes on
PyTorch's `meta` device (shapes only, no weights allocated, nothing downloaded) under
`torch.utils.flop_counter.FlopCounterMode`:

  LLM        transformers LlamaForCausalLM with the Llama-3.2-3B architecture written below, the
             recipe's peft LoRA (trainer.model.llm.add_lora), the recipe's attention backend. Forward
             and the REAL backward (autograd on meta): the base is frozen, so backward computes
             activation gradients (plus the tiny LoRA weight gradients), about 1x forward. Logits
             are computed on the target rows only (transcript + EOS), as LlamaAVSR._cross_entropy does.
  Whisper    transformers WhisperEncoder, medium size, forward only (frozen, under no_grad), through
             the project's WhisperAudioEncoder: with whisper_pad_to_30s every clip is padded to the
             30 s window, so the encoder always runs 3000 mel frames -> 1500 frames per clip.
  AV-HuBERT  the project's AVHubertVideoEncoder with AVHubertConfig.large() (3-D conv + ResNet-18 on
             88x88 frames, 24 layers d1024). Forward only when frozen; with video_lora (VSR recipe)
             backward runs through its Transformer (activation gradients down to layer 0's LoRA).
  projectors the project's Projector (stack + 2-layer MLP [+ pre-fusion LayerNorm]), forward+backward.

FlopCounterMode counts matmuls, convolutions and attention (on meta, sdpa and eager attention both
run as bmm and are counted, dense T x T, causal half not discounted); it ignores elementwise ops
(norms, activations, softmax, RoPE, the decorrelation loss), which are a few percent at most.

Sequence lengths come from the recipe: video tokens = ceil(frames / video_rate), audio tokens =
ceil(Whisper frames (50 Hz) / audio_rate), laid out by trainer.model.prompt.layout_sample
(BOS, <video> V </video>, <audio> A </audio>, instruction, transcript, EOS).

    python bench/estimate_lrs3.py                                          # lrs3_avsr.yaml, 8 GPUs
    python bench/estimate_lrs3.py --recipe launch/recipes/lrs3_asr.yaml --gpus 16 --json est.json
    python bench/estimate_lrs3.py --measured-samples-per-s 95 --measured-gpus 8   # MLflow perf/samples_per_s

Everything below the FLOP count is an ESTIMATE: the corpus figures are approximate, and without a
measured throughput the time rests on the assumed MFU.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.model.avhubert import AVHubertConfig, AVHubertVideoEncoder  # noqa: E402
from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.prompt import IGNORE_INDEX, INSTRUCTIONS, layout_sample  # noqa: E402
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

FPS = 25                      # video frames per second (trainer.data.config.FPS)
WHISPER_HZ = 50               # Whisper encoder frames per second (100 Hz mels, conv stride 2)
MELS_PER_VIDEO_FRAME = 4      # trainer.data.config.MELS_PER_FRAME

# The trainer resizes Llama-3's tables for the tokens it adds: <pad> (Llama 3 has none) and the four
# modality delimiters (trainer.model.tokenizer.add_avsr_special_tokens).
LLAMA3_VOCAB = 128_256
LLAMA3_ADDED_TOKENS = 5


# ----------------------------------------------------------------------------- architectures

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
    """meta-llama/Llama-3.2-1B's config.json, written out (nothing is downloaded)."""
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
    """One training clip as the model sees it."""
    video_frames: int
    """25 fps frames (also fixes the audio length: 4 mel frames per video frame)."""
    instruction_tokens: int
    transcript_tokens: int

    @property
    def mel_frames(self) -> int:
        return MELS_PER_VIDEO_FRAME * self.video_frames

    @property
    def whisper_frames(self) -> int:
        """50 Hz encoder frames of the clip's own length (whisper_output_lengths)."""
        return (self.mel_frames + 1) // 2

    @classmethod
    def from_duration(cls, seconds: float, instruction_tokens: int, words_per_s: float = WORDS_PER_S,
                      tokens_per_word: float = TOKENS_PER_WORD) -> "SampleShape":
        return cls(video_frames=max(2, round(FPS * seconds)), instruction_tokens=instruction_tokens,
                   transcript_tokens=max(1, round(seconds * words_per_s * tokens_per_word)))


_SPECIALS = SpecialTokenIds(bos=1, eos=2, pad=0, audio_start=3, audio_end=4, video_start=5, video_end=6)


def sequence_layout(cfg: ModelConfig, shape: SampleShape) -> dict:
    """Token counts of the LLM input, laid out by the trainer's own prompt code."""
    counts = {}
    if cfg.uses_video:
        counts["video"] = -(-shape.video_frames // cfg.video_rate)
    if cfg.uses_audio:
        counts["audio"] = -(-shape.whisper_frames // cfg.audio_rate)
    layout = layout_sample(_SPECIALS, [(m, counts[m]) for m in cfg.enabled_modalities],
                           [7] * shape.instruction_tokens, [8] * shape.transcript_tokens)
    labels = layout.labels
    return {
        "tokens": len(layout.input_ids),
        "video_tokens": counts.get("video", 0),
        "audio_tokens": counts.get("audio", 0),
        "instruction_tokens": shape.instruction_tokens,
        "transcript_tokens": shape.transcript_tokens,
        "target_tokens": sum(1 for x in labels[1:] if x != IGNORE_INDEX),     # transcript + EOS
        "roles": layout.roles,
    }


# ----------------------------------------------------------------------------- building on meta

class _Parts(nn.Module):
    """The trainable/frozen parts under the attribute names of LlamaAVSR, so that parameter names
    (and so the trainer's own counting rule in Trainer._count_params) are the same."""

    def __init__(self, llm, audio_encoder, video_encoder, audio_projector, video_projector, delimiters):
        super().__init__()
        self.llm = llm
        self.audio_encoder = audio_encoder
        self.video_encoder = video_encoder
        self.audio_projector = audio_projector
        self.video_projector = video_projector
        self.delimiter_embeddings = delimiters


def build_parts(cfg: ModelConfig, llm_config, whisper_config=None, avhubert_config: AVHubertConfig | None = None,
                dtype: torch.dtype = torch.bfloat16, device: str = "meta") -> _Parts:
    """The model's modules with the trainer's freezing and LoRA, on `device` (meta: no memory)."""
    from transformers import LlamaForCausalLM
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from trainer.model.audio_encoder import WhisperAudioEncoder
    from trainer.model.avsr import _add_video_lora
    from trainer.model.llm import add_lora
    from trainer.model.projector import Projector

    with torch.device(device):
        llm = LlamaForCausalLM._from_config(llm_config, attn_implementation=cfg.llm_attn_implementation,
                                            dtype=dtype)
        llm.requires_grad_(False)
        audio = video = audio_proj = video_proj = None
        if cfg.uses_audio:
            if whisper_config is None:
                raise ValueError(f"modality {cfg.modality!r} needs a Whisper config")
            enc = WhisperEncoder(whisper_config).to(dtype).requires_grad_(False)
            audio = WhisperAudioEncoder(enc.eval(), pad_to_window=cfg.whisper_pad_to_30s)
            audio_proj = Projector(audio.out_dim, llm_config.hidden_size, cfg.audio_rate, cfg.downsample,
                                   cfg.projector_hidden, cfg.prefusion_layernorm).to(dtype)
        if cfg.uses_video:
            if avhubert_config is None:
                raise ValueError(f"modality {cfg.modality!r} needs an AV-HuBERT config")
            video = AVHubertVideoEncoder(avhubert_config).to(dtype)
            video.requires_grad_(not cfg.freeze_video_encoder)
            if cfg.video_lora:
                _add_video_lora(video, cfg)
                video.to(device=device, dtype=dtype)
            video.eval()
            video_proj = Projector(video.out_dim, llm_config.hidden_size, cfg.video_rate, cfg.downsample,
                                   cfg.projector_hidden, cfg.prefusion_layernorm).to(dtype)
        delimiters = nn.Embedding(4, llm_config.hidden_size, dtype=dtype)
    llm = add_lora(llm, cfg)
    llm.to(device=device, dtype=dtype)     # DeepSpeed bf16 runs the LoRA adapters in bf16 too
    return _Parts(llm, audio, video, audio_proj, video_proj, delimiters)


def parameter_counts(parts: _Parts) -> dict[str, int]:
    counts = {"llm_total": 0, "llm_base": 0, "llm_embedding": 0, "llm_lora": 0, "whisper_encoder": 0,
              "avhubert": 0, "avhubert_lora": 0, "projectors": 0, "delimiters": 0, "trainable": 0,
              "total": 0}
    embedding = parts.llm.get_base_model().get_input_embeddings().weight
    for name, p in parts.named_parameters():
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
    # The trainer's rule (Trainer._count_params) for its logged parameter counts.
    counts["trainer_llm"] = sum(p.numel() for n, p in parts.named_parameters() if n.startswith("llm."))
    counts["trainer_encoders"] = sum(p.numel() for n, p in parts.named_parameters()
                                     if not n.startswith("llm.") and "encoder" in n)
    return counts


# ----------------------------------------------------------------------------- counting

@contextmanager
def _counting(into: dict, key: str):
    mode = FlopCounterMode(display=False)
    with mode:
        yield
    into[key] = into.get(key, 0) + mode.get_total_flops()


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward (activation memory), weights excluded,
    each storage counted once. `tt_bytes`: the [.., T, T] attention tensors among them, which the
    math attention path on meta/CPU keeps but sdpa's flash / memory-efficient kernels on a GPU do not."""

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


def _causal_mask(batch: int, seq: int, device) -> torch.Tensor:
    # A prepared 4-D mask: transformers' own mask building reads tensor values, which meta cannot.
    # Same FLOPs as the trainer's 2-D mask (attention is dense either way).
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, seq, seq)


def run_step(parts: _Parts, cfg: ModelConfig, shape: SampleShape, *, batch: int = 1, logits: str = "targets",
             backward: bool = True, measure_memory: bool = False) -> dict:
    """One training step on `batch` identical clips (no padding), mirroring LlamaAVSR.forward: encoders
    (no_grad when frozen), projectors, prompt, decoder, LM head on the target rows, CE (+ decorrelation
    loss), backward. Returns FLOPs by part (and, with measure_memory, saved-activation bytes)."""
    if logits not in ("targets", "all"):
        raise ValueError(f"logits must be 'targets' or 'all', got {logits!r}")
    lay = sequence_layout(cfg, shape)
    T, B = lay["tokens"], batch
    base = parts.llm.get_base_model()
    hidden = base.config.hidden_size
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    flops: dict[str, float] = {}
    saved = _SavedBytes(list(parts.parameters()), T) if measure_memory else None
    hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack) if saved else nullcontext()

    with hooks:
        # ---- encoders and projectors
        tokens = {}
        enc_out = {}
        if cfg.uses_audio:
            mel = torch.zeros(B, parts.audio_encoder.n_mels, shape.mel_frames, device=device, dtype=dtype)
            lengths = torch.full((B,), shape.mel_frames, device=device)
            with _counting(flops, "whisper_fwd"), torch.no_grad():
                frames, flen = parts.audio_encoder(mel, lengths)
            enc_out["audio"] = frames
            with _counting(flops, "projectors_fwd"):
                tokens["audio"] = parts.audio_projector(frames, flen)[0]
        if cfg.uses_video:
            video = torch.zeros(B, shape.video_frames, 88, 88, device=device, dtype=dtype)
            lengths = torch.full((B,), shape.video_frames, device=device)
            trainable = any(p.requires_grad for p in parts.video_encoder.parameters())
            with _counting(flops, "avhubert_fwd"), (nullcontext() if trainable else torch.no_grad()):
                frames, flen = parts.video_encoder(video, lengths)
            enc_out["video"] = frames
            frames_in = frames.detach().requires_grad_(frames.requires_grad)   # split the backward by part
            enc_out["video_in"] = frames_in
            with _counting(flops, "projectors_fwd"):
                tokens["video"] = parts.video_projector(frames_in, flen)[0]
        for m, x in tokens.items():
            if x.shape[1] != lay[f"{m}_tokens"]:
                raise AssertionError(f"{m}: projector gave {x.shape[1]} tokens, layout expects {lay[m + '_tokens']}")

        # ---- prompt: BOS, <m> tokens </m> ..., instruction, transcript, EOS (prompt.layout_sample)
        embed = base.get_input_embeddings()
        delim = parts.delimiter_embeddings

        def ids(n: int) -> torch.Tensor:
            return torch.zeros(B, n, dtype=torch.long, device=device)

        pieces = [embed(ids(1))]
        for m in cfg.enabled_modalities:
            d = delim(ids(2))
            pieces += [d[:, :1], tokens[m], d[:, 1:]]
        pieces.append(embed(ids(shape.instruction_tokens + shape.transcript_tokens + 1)))
        embeds = torch.cat(pieces, dim=1)
        if embeds.shape[1] != T:
            raise AssertionError(f"assembled {embeds.shape[1]} tokens, layout says {T}")
        llm_in = embeds.detach().requires_grad_()

        # ---- LLM decoder, LM head, losses
        measure_dec = cfg.decorrelation_weight > 0 or cfg.measure_decorrelation_when_off
        with _counting(flops, "llm_fwd"):
            out = base.model(inputs_embeds=llm_in, attention_mask=_causal_mask(B, T, device),
                             position_ids=torch.arange(T, device=device)[None].expand(B, T),
                             output_hidden_states=measure_dec, use_cache=False)
            h = out.last_hidden_state[:, :-1]
            n_logits = lay["target_tokens"] if logits == "targets" else T - 1
            rows = h[:, -n_logits:].reshape(-1, hidden)          # targets are the last rows
            logit = base.get_output_embeddings()(rows)
            ce = torch.nn.functional.cross_entropy(
                logit.float(), torch.zeros(rows.shape[0], dtype=torch.long, device=device))
            loss = ce
            if measure_dec:
                from trainer.kernels.decorrelation_reference import decorrelation_loss_reference
                from trainer.model.roles import prefix_mask
                roles = torch.tensor(lay["roles"], device="cpu")[None].expand(B, T)
                mask = prefix_mask(roles).to(device)
                layers_idx = (range(1, base.config.num_hidden_layers) if cfg.decorrelation_layers is None
                              else cfg.decorrelation_layers)
                with nullcontext() if cfg.decorrelation_weight > 0 else torch.no_grad():
                    dec = decorrelation_loss_reference([out.hidden_states[i] for i in layers_idx], mask)
                if cfg.decorrelation_weight > 0:
                    loss = loss + cfg.decorrelation_weight * dec

    result = {"flops": flops, "layout": {k: v for k, v in lay.items() if k != "roles"}, "batch": B,
              "logit_rows": n_logits}
    if saved is not None:
        result["saved_bytes"] = saved.total
        result["saved_tt_bytes"] = saved.tt_bytes
    if not backward:
        return result

    # ---- backward: the real autograd backward, split by part
    lora = [p for p in parts.llm.parameters() if p.requires_grad]
    with _counting(flops, "llm_bwd"):
        grads = torch.autograd.grad(loss, [llm_in] + lora)
    with _counting(flops, "projectors_bwd"):
        embeds.backward(grads[0])
    if cfg.uses_video and enc_out["video"].requires_grad:
        with _counting(flops, "avhubert_bwd"):
            enc_out["video"].backward(enc_out["video_in"].grad)
    return result


def count_sample_flops(cfg: ModelConfig, shape: SampleShape, llm_config, whisper_config=None,
                       avhubert_config: AVHubertConfig | None = None, *, logits: str = "targets",
                       backward: bool = True, dtype: torch.dtype = torch.bfloat16) -> dict:
    """FLOPs of one training clip, counted on meta. Any sizes (tests pass tiny configs).
    Returns {"flops": {part: FLOPs}, "params": {...}, "layout": {...}, "trainer_flops": ...}, the last
    being what the trainer's perf/mfu counts for this clip (trainer.engine.flops.StepFlops)."""
    from trainer.engine.flops import StepFlops

    parts = build_parts(cfg, llm_config, whisper_config, avhubert_config, dtype=dtype)
    res = run_step(parts, cfg, shape, logits=logits, backward=backward)
    res["params"] = parameter_counts(parts)
    lay = res["layout"]
    res["trainer_flops"] = StepFlops.from_model(parts)(
        [lay["tokens"]], lay["target_tokens"],
        audio_lengths=[shape.mel_frames] if cfg.uses_audio else (),
        video_lengths=[shape.video_frames] if cfg.uses_video else ())
    return res


def measure_activation_bytes(cfg: ModelConfig, shape: SampleShape, llm_config, whisper_config=None,
                             avhubert_config: AVHubertConfig | None = None, batch: int = 1) -> dict:
    """Bytes autograd saves for one micro-batch of `batch` clips (forward only, on meta)."""
    parts = build_parts(cfg, llm_config, whisper_config, avhubert_config)
    res = run_step(parts, cfg, shape, batch=batch, backward=False, measure_memory=True)
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
        from trainer.model.tokenizer import load_tokenizer
        instr = len(load_tokenizer(args.tokenizer)(instr_text, add_special_tokens=False)["input_ids"])
        instr_source = f"measured with {args.tokenizer}"
    else:
        instr, instr_source = estimate_instruction_tokens(instr_text), "estimated (no Llama-3 tokenizer offline)"

    clip_s = args.hours * 3600.0 / args.clips
    shape = SampleShape.from_duration(clip_s, instr, args.words_per_s, args.tokens_per_word)
    llm_config = llama32_3b_config()
    whisper_config = whisper_medium_config() if cfg.uses_audio else None
    av_config = AVHubertConfig.large() if cfg.uses_video else None
    res = count_sample_flops(cfg, shape, llm_config, whisper_config, av_config)
    f, p, lay = res["flops"], res["params"], res["layout"]

    parts = {
        "llm": f.get("llm_fwd", 0) + f.get("llm_bwd", 0),
        "projectors": f.get("projectors_fwd", 0) + f.get("projectors_bwd", 0),
        "whisper": f.get("whisper_fwd", 0),
        "avhubert": f.get("avhubert_fwd", 0) + f.get("avhubert_bwd", 0),
    }
    per_clip = sum(parts.values())
    per_epoch = per_clip * args.clips
    run = per_epoch * args.epochs
    hidden, vocab = llm_config.hidden_size, llm_config.vocab_size
    all_logits_extra = 2 * 2.0 * hidden * vocab * (lay["tokens"] - 1 - res["logit_rows"])   # fwd + act-bwd

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
        "sample": {**asdict(shape), "mel_frames": shape.mel_frames, "whisper_frames": shape.whisper_frames,
                   "whisper_window_frames": 1500 if cfg.whisper_pad_to_30s else shape.whisper_frames,
                   **lay, "logit_rows": res["logit_rows"]},
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
        f"{_t(f['detail'].get('llm_bwd', 0))}) | {_t(f['llm'])} |",
        f"| TFLOPs/clip: Whisper encoder fwd (30 s window) | {used(f['whisper'], _t(f['whisper']))} |",
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
