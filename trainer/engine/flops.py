"""Model FLOPs of a training micro-batch, for perf/mfu.

    flops = StepFlops.from_model(model, cfg.data.crop_size)    # once, on every rank (no weights are read)
    flops(input_lengths, num_targets, audio_lengths, video_lengths) -> float

LLM, closed form (what torch.utils.flop_counter counts for a frozen Llama with LoRA; the
frozen base gets activation gradients only, so the backward of a matmul costs its forward,
and attention's backward costs twice its forward):
    4 * P_mm * tokens + 12 * layers * d_attn * sum_b T_b^2 + 4 * d * V * targets
P_mm: the decoder blocks' Linear weights (LoRA included), tokens: real LLM tokens, T_b: each
sample's length (attention counted dense, as the counter does), the LM head runs on the
target rows only (LlamaAVSR._cross_entropy).

Encoders: their forward (and, for a trainable AV-HuBERT, the backward of its Transformer)
counted once at start-up by FlopCounterMode on a copy built on the `meta` device from the
encoder's config (no memory, works under ZeRO-3), at two lengths, giving c1 * n + c2 * n^2
per clip of n frames; Whisper padded to its 30 s window costs the same for every clip.
Left out: projectors (~0.3 %), norms, activations, softmax, the decorrelation loss.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FIT_LENGTHS = (8, 16)   # frames at which the encoders are counted (exact for c1 n + c2 n^2)


@dataclass(frozen=True)
class Quadratic:
    """FLOPs of one clip of n units: c0 + c1 n + c2 n^2."""
    c0: float = 0.0
    c1: float = 0.0
    c2: float = 0.0

    def __call__(self, n: float) -> float:
        return self.c0 + self.c1 * n + self.c2 * n * n

    @classmethod
    def fit(cls, count, lengths: tuple[int, int] = FIT_LENGTHS) -> "Quadratic":
        """From count(n) at two lengths, for a cost with no constant term."""
        (n1, n2), (f1, f2) = lengths, (count(lengths[0]), count(lengths[1]))
        c2 = (f2 / n2 - f1 / n1) / (n2 - n1)
        return cls(c1=f1 / n1 - c2 * n1, c2=c2)


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))     # ZeRO-3 empties partitioned tensors


def _counted(fn) -> float:
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return float(mode.get_total_flops())


@dataclass(frozen=True)
class StepFlops:
    llm_matmul_params: int
    llm_layers: int
    llm_attn_width: int
    lm_head_params: int
    audio: Quadratic | None = None
    """Whisper forward per clip, in 50 Hz encoder frames (a constant when padded to its window)."""
    video: Quadratic | None = None
    """AV-HuBERT per clip, in 25 fps frames: forward, plus the Transformer's backward when trainable."""

    @classmethod
    def from_model(cls, model, crop_size: int) -> "StepFlops":
        """`model`: a LlamaAVSR, or anything with .llm (peft-wrapped causal LM), .audio_encoder and
        .video_encoder (None when unused)."""
        base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
        cfg = base.config
        layers = base.model.layers
        mm = sum(_numel(m.weight) for m in layers.modules() if isinstance(m, nn.Linear))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        head = base.get_output_embeddings()
        audio = whisper_flops(model.audio_encoder) if model.audio_encoder is not None else None
        video = avhubert_flops(model.video_encoder, crop_size) if model.video_encoder is not None else None
        return cls(llm_matmul_params=mm, llm_layers=len(layers), llm_attn_width=cfg.num_attention_heads * head_dim,
                   lm_head_params=_numel(head.weight), audio=audio, video=video)

    def llm(self, input_lengths: Sequence[int], num_targets: int) -> float:
        tokens = sum(input_lengths)
        pairs = sum(t * t for t in input_lengths)
        return (4.0 * self.llm_matmul_params * tokens + 12.0 * self.llm_layers * self.llm_attn_width * pairs
                + 4.0 * self.lm_head_params * num_targets)

    def __call__(self, input_lengths: Sequence[int], num_targets: int, audio_lengths: Sequence[int] = (),
                 video_lengths: Sequence[int] = ()) -> float:
        """input_lengths: real LLM tokens per sample; audio_lengths: mel frames per clip (100 Hz);
        video_lengths: video frames per clip."""
        total = self.llm(input_lengths, num_targets)
        if self.audio is not None:
            total += sum(self.audio(-(-int(m) // 2)) for m in audio_lengths)
        if self.video is not None:
            total += sum(self.video(int(f)) for f in video_lengths)
        return total


def whisper_flops(audio_encoder) -> Quadratic:
    """WhisperAudioEncoder -> forward FLOPs per clip in encoder frames, counted on a meta copy."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from trainer.model.audio_encoder import WhisperAudioEncoder

    config = audio_encoder.encoder.config
    with torch.device("meta"):
        copy = WhisperAudioEncoder(WhisperEncoder(config).eval(), pad_to_window=audio_encoder.pad_to_window)
    n_mels = config.num_mel_bins

    def count(mel_frames: int) -> float:
        with torch.device("meta"), torch.no_grad():
            mel = torch.zeros(1, n_mels, mel_frames)
            if copy.pad_to_window:
                return _counted(lambda: copy.encoder(input_features=mel))
            return _counted(lambda: copy._natural_length_forward(mel))

    if copy.pad_to_window:
        return Quadratic(c0=count(copy.window_frames))
    # n encoder frames come from 2n mel frames
    return Quadratic.fit(lambda n: count(2 * n))


def avhubert_flops(video_encoder, crop_size: int) -> Quadratic:
    """AVHubertVideoEncoder -> FLOPs per clip in frames, counted on a meta copy: the forward, and when
    any of its weights train (LoRA), the activation backward of its Transformer (its front end is
    frozen and its input is data, so nothing flows back into the convolutions)."""
    from trainer.model.avhubert import AVHubertVideoEncoder
    from trainer.model.projector import frame_mask

    trainable = any(p.requires_grad for p in video_encoder.parameters())
    with torch.device("meta"):
        copy = AVHubertVideoEncoder(video_encoder.cfg).eval().requires_grad_(False)

    def count(frames: int) -> float:
        mode = FlopCounterMode(display=False)
        with torch.device("meta"), mode:
            video = torch.zeros(1, frames, crop_size, crop_size)
            real = frame_mask(torch.full((1,), frames, dtype=torch.long), frames)
            with torch.no_grad():
                x = copy.frame_features(video)
            x.requires_grad_(trainable)
            with torch.enable_grad() if trainable else torch.no_grad():
                out = copy.contextualise(x, real)
            if trainable:
                out.sum().backward()
        return float(mode.get_total_flops())

    return Quadratic.fit(count)
