"""LlamaAVSR: encoders -> projectors -> prompt -> LoRA LLM, and `build_model`.

Trainable: LoRA adapters of the LLM, the projectors, and (by config) the four delimiter
embeddings (frozen by default, as in the paper's code), AV-HuBERT LoRA adapters or all of
AV-HuBERT. Frozen: Whisper, AV-HuBERT (default) and the LLM base, including its embedding table.

Delimiter tokens: <audio> </audio> <video> </video> get rows in the resized LLM vocabulary (so
every id is valid for the tokenizer, the monitor and generate), but their input embeddings are
taken from `delimiter_embeddings`, a small [4, D] table initialised from those rows (trainable with
--model.freeze-delimiters false).
Training rows of the LLM's table instead would mean a trainable 128k x D matrix (and, with the
tied embeddings of Llama 3.2, changing output logits too); the small table is also ZeRO-3
friendly. The model never has to emit these tokens: generation suppresses them.

Token ids in, token ids out: the model holds no tokenizer. It is built with its prompt's fixed ids
(`PromptIds`), reads each transcript's ids from `batch["transcript_ids"]` and generates ids; the
callers tokenize and decode with trainer.model.prompt_text.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from trainer.data.config import Streams

from .audio_encoder import WhisperAudioEncoder, whisper_output_lengths
from .avhubert import AVHubertConfig, AVHubertVideoEncoder
from .config import ModelConfig
from .decoding import DecodingConfig, generate_ids
from .prompt import AssembledInputs, assemble
from .prompt_text import PromptIds, prompt_ids
from .projector import Projector, downsampled_lengths
from .roles import prefix_mask
from .tokenizer import SpecialTokenIds


@dataclass
class AVSROutput(ModelOutput):
    """A dataclass that is also a dict (transformers' ModelOutput), so that DeepSpeed's ZeRO-3
    hooks can find the tensors in the model's output. Fields are always set by forward."""
    loss: torch.Tensor | None = None
    """ce_loss + dec_loss: what the optimiser minimises."""
    ce_loss: torch.Tensor | None = None
    """Mean cross-entropy over the batch's target tokens (transcript + EOS)."""
    dec_loss: torch.Tensor | None = None
    """decorrelation_weight * dec_loss_raw (0 when the weight is 0)."""
    dec_loss_raw: torch.Tensor | None = None
    """Unscaled decorrelation loss (mean cos^2 to BOS over prefix tokens and layers); NaN when not measured."""
    num_target_tokens: torch.Tensor | None = None
    """Number of target tokens (long scalar), to weight ce_loss across micro-batches and ranks."""
    num_prefix_tokens: torch.Tensor | None = None
    """Number of decorrelation-prefix tokens (long scalar), to weight dec_loss_raw likewise."""
    num_input_tokens: torch.Tensor | None = None
    """Real (non-pad) LLM input tokens in the batch, for tokens/s and MFU."""
    input_lengths: torch.Tensor | None = None
    """Real LLM input tokens per sample (long [B]), for the attention FLOPs of MFU."""


class LlamaAVSR(nn.Module):
    def __init__(self, cfg: ModelConfig, prompt: PromptIds, llm, audio_encoder: WhisperAudioEncoder | None,
                 video_encoder: AVHubertVideoEncoder | None, audio_projector: Projector | None,
                 video_projector: Projector | None, delimiter_embeddings: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.specials: SpecialTokenIds = prompt.specials
        self.instruction_ids = list(prompt.instruction)
        self.llm = llm
        self.audio_encoder = audio_encoder
        self.video_encoder = video_encoder
        self.audio_projector = audio_projector
        self.video_projector = video_projector
        self.delimiter_embeddings = delimiter_embeddings
        num_layers = self.base_llm.config.num_hidden_layers
        self.decorrelation_layers = (tuple(range(1, num_layers)) if cfg.decorrelation_layers is None
                                     else cfg.decorrelation_layers)
        if any(i > num_layers for i in self.decorrelation_layers):
            raise ValueError(f"decorrelation_layers {self.decorrelation_layers} out of range: the LLM has "
                             f"{num_layers} layers, so hidden_states indices go 0..{num_layers}")
        self.train()

    @property
    def input_streams(self) -> Streams:
        """What the data pipeline decodes for this model: its modality's streams, and the mel bins of
        its Whisper (the checkpoint's, or --model.tiny.n-mels)."""
        return self.cfg.streams(self.audio_encoder.n_mels if self.audio_encoder is not None else None)

    # ----------------------------------------------------------------- parts of the LLM
    @property
    def base_llm(self):
        """The causal LM under the peft wrapper (LoRA layers are inside it)."""
        return self.llm.get_base_model()

    @property
    def decoder(self):
        """The decoder stack (e.g. LlamaModel) returning hidden states, without the LM head."""
        return self.base_llm.model

    def train(self, mode: bool = True) -> "LlamaAVSR":
        super().train(mode)
        # Encoders always run in eval mode: frozen BatchNorm statistics, no dropout.
        for enc in (self.audio_encoder, self.video_encoder):
            if enc is not None:
                enc.eval()
        return self

    # ----------------------------------------------------------------- inputs
    def _video_trainable(self) -> bool:
        return self.video_encoder is not None and any(p.requires_grad for p in self.video_encoder.parameters())

    def encode(self, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """modality -> (projected tokens [B, N, D_llm], token lengths [B]) for every enabled modality.
        The set of modules run depends on the config only, never on the data (ZeRO-3 safety)."""
        features = {}
        for modality in self.cfg.enabled_modalities:
            if modality not in batch or f"{modality}_lengths" not in batch:
                raise KeyError(f"modality {self.cfg.modality!r} needs batch['{modality}'] and "
                               f"batch['{modality}_lengths']; got keys {sorted(batch)}")
            data, lengths = batch[modality], batch[f"{modality}_lengths"].long()
            if lengths.min() < 1 or lengths.max() > data.shape[-1 if modality == "audio" else 1]:
                raise ValueError(f"{modality}_lengths {lengths.tolist()} do not fit the padded {modality} "
                                 f"tensor of shape {tuple(data.shape)}")
            if modality == "audio":
                with torch.no_grad():
                    frames, lengths = self.audio_encoder(data, lengths)
                projector = self.audio_projector
            else:
                with nullcontext() if self._video_trainable() else torch.no_grad():
                    frames, lengths = self.video_encoder(data, lengths)
                projector = self.video_projector
            features[modality] = projector(frames.to(projector.fc1.weight.dtype), lengths)
        return features

    def assemble(self, batch: dict, for_generation: bool = False) -> AssembledInputs:
        """LLM inputs for a batch: right-padded with transcript + EOS for training, or a left-padded
        prompt (no transcript) for generation."""
        transcripts = None if for_generation else _transcript_ids(batch)
        return assemble(
            features=self.encode(batch), modality_order=self.cfg.modality_order, specials=self.specials,
            instruction_ids=self.instruction_ids, transcripts=transcripts,
            embed_tokens=self.base_llm.get_input_embeddings(), embed_delimiters=self.delimiter_embeddings,
        )

    # ----------------------------------------------------------------- training
    def forward(self, batch: dict) -> AVSROutput:
        inputs = self.assemble(batch)
        measure_dec = self.cfg.decorrelation_weight > 0 or self.cfg.measure_decorrelation_when_off
        out = self.decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids, output_hidden_states=measure_dec, use_cache=False)
        ce_loss, num_targets = self._cross_entropy(out.last_hidden_state, inputs)

        zero = ce_loss.new_zeros(())
        dec_raw, dec = zero + float("nan"), zero
        if measure_dec:
            with nullcontext() if self.cfg.decorrelation_weight > 0 else torch.no_grad():
                dec_raw = self._decorrelation(out.hidden_states, inputs.token_roles)
            if self.cfg.decorrelation_weight > 0:
                dec = self.cfg.decorrelation_weight * dec_raw
            dec_raw = dec_raw.detach()
        return AVSROutput(loss=ce_loss + dec, ce_loss=ce_loss, dec_loss=dec, dec_loss_raw=dec_raw,
                          num_target_tokens=num_targets, num_prefix_tokens=prefix_mask(inputs.token_roles).sum(),
                          num_input_tokens=inputs.attention_mask.sum(),
                          input_lengths=inputs.attention_mask.sum(1))

    def token_counts(self, batch: dict) -> tuple[int, int]:
        """(target tokens, decorrelation-prefix tokens) of a batch, from its transcripts and lengths
        alone: what `forward` will report as num_target_tokens / num_prefix_tokens, known before any
        forward, so that the trainer can weight every micro-batch by the global batch's counts."""
        transcripts = _transcript_ids(batch)
        targets = sum(len(t) + 1 for t in transcripts)    # transcript + EOS
        prefix = torch.full((len(transcripts),), len(self.instruction_ids), dtype=torch.long)
        for modality in self.cfg.enabled_modalities:
            lengths = batch[f"{modality}_lengths"].long().cpu()
            if modality == "audio":
                lengths, rate = whisper_output_lengths(lengths), self.audio_projector.rate
            else:
                rate = self.video_projector.rate
            prefix += 2 + downsampled_lengths(lengths, rate)          # <modality> tokens </modality>
        return targets, int(prefix.sum())

    def _token_nll(self, hidden: torch.Tensor, inputs: AssembledInputs) -> torch.Tensor:
        """Next-token cross-entropy [N] of each target position, in fp32. The LM head runs on those rows
        alone, not on [B, T, vocab], which matters with a 128k vocabulary."""
        logits = self.base_llm.get_output_embeddings()(hidden[inputs.predicting_positions])
        return F.cross_entropy(logits.float(), inputs.target_ids, reduction="none")

    def _cross_entropy(self, hidden: torch.Tensor, inputs: AssembledInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's mean CE over its target tokens, and their number."""
        num = torch.tensor(inputs.target_ids.numel(), device=hidden.device)
        return self._token_nll(hidden, inputs).sum() / num.clamp_min(1), num

    @torch.no_grad()
    def target_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the summed teacher-forced cross-entropy of its target tokens (transcript + EOS),
        exactly the training loss's terms, and their number ([B] fp32, [B] long). No hidden states, no
        decorrelation term: the cheap pass behind the test loss per token."""
        inputs = self.assemble(batch)
        out = self.decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids, use_cache=False)
        rows = inputs.predicting_positions[0]
        b = inputs.inputs_embeds.shape[0]
        nll = torch.zeros(b, dtype=torch.float32, device=rows.device).index_add_(
            0, rows, self._token_nll(out.last_hidden_state, inputs))
        return nll, torch.bincount(rows, minlength=b)

    def _decorrelation(self, hidden_states, token_roles: torch.Tensor) -> torch.Tensor:
        from trainer.kernels import decorrelation_loss   # lazy: the kernel package is built separately

        layers = [hidden_states[i] for i in self.decorrelation_layers]
        return decorrelation_loss(layers, prefix_mask(token_roles), impl=self.cfg.decorrelation_impl)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(self, batch: dict, num_beams: int = 1, max_new_tokens: int = 32, synced_gpus: bool = False,
                 length_penalty: float = 1.0) -> list[list[int]]:
        """Transcript ids per sample, cut at EOS (trainer.model.prompt_text.decode_transcripts -> text)."""
        prompt = self.assemble(batch, for_generation=True)
        decoding = DecodingConfig(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  length_penalty=length_penalty, synced_gpus=synced_gpus)
        return generate_ids(self.llm, self.specials, prompt, decoding)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device`, except the `*_lengths`: they set the prompt's layout, which is
    computed on the host (prompt.py), so they stay there and no forward reads a device tensor back."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and not k.endswith("_lengths")
                else v) for k, v in batch.items()}


def _transcript_ids(batch: dict) -> list[list[int]]:
    if "transcript_ids" not in batch:
        raise KeyError("the batch has no 'transcript_ids': the model takes token ids; tokenize the transcripts "
                       "first with trainer.model.prompt_text.with_transcript_ids(tokenizer, batch)")
    return [list(t) for t in batch["transcript_ids"]]


# --------------------------------------------------------------------------- building

def _is_zero3(ds_config: dict | None) -> bool:
    return bool(ds_config) and int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


def build_tokenizer(cfg: ModelConfig):
    from .tokenizer import add_avsr_special_tokens, character_tokenizer, load_tokenizer

    from .hub import local_folder

    path = (local_folder(cfg.tokenizer_path) if cfg.tokenizer_path
            else local_folder(cfg.llm_path, cfg.llm_revision) if cfg.llm_path else None)
    tokenizer = load_tokenizer(path) if path else character_tokenizer()
    return add_avsr_special_tokens(tokenizer)


def build_audio_encoder(cfg: ModelConfig, ds_config: dict | None = None) -> WhisperAudioEncoder:
    """Whisper encoder (frozen) from a hub name or folder, or tiny. Only the encoder's tensors are read
    (never the decoder's). Under ZeRO-3 the plain encoder is partitioned right after loading
    (zero.Init(module=...)): transformers' own ZeRO-3 loading of Whisper crashes in its sinusoid
    init on partitioned (empty) position tables, so it is not used here."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from .audio_encoder import read_whisper_encoder_weights
    from .llm import DTYPES
    from .loading import load_state_dict_exact

    if cfg.whisper_path is None:
        w = cfg.tiny.whisper_width
        config = WhisperConfig(num_mel_bins=cfg.tiny.n_mels, d_model=w, encoder_layers=cfg.tiny.whisper_layers,
                               encoder_attention_heads=cfg.tiny.whisper_heads, encoder_ffn_dim=4 * w,
                               decoder_layers=1, decoder_attention_heads=cfg.tiny.whisper_heads, decoder_ffn_dim=4 * w,
                               max_source_positions=cfg.tiny.whisper_max_source_positions,
                               init_std=cfg.tiny.whisper_init_std)
        encoder = WhisperEncoder(config)
    else:
        from .hub import local_folder

        folder = local_folder(cfg.whisper_path, cfg.whisper_revision)
        config = WhisperConfig.from_pretrained(folder, local_files_only=True)
        encoder = WhisperEncoder(config)
        state = read_whisper_encoder_weights(folder)
        load_state_dict_exact(encoder, state, what=f"Whisper encoder ({cfg.whisper_path})")
        encoder.to(DTYPES[cfg.load_dtype])
    encoder.requires_grad_(False)
    if _is_zero3(ds_config):
        import deepspeed

        deepspeed.zero.Init(module=encoder, config_dict_or_path=ds_config)
    return WhisperAudioEncoder(encoder.eval(), pad_to_window=cfg.whisper_pad_to_30s)


def build_video_encoder(cfg: ModelConfig, init_ctx=nullcontext) -> AVHubertVideoEncoder:
    """AV-HuBERT built under `init_ctx()` (zero.Init under ZeRO-3), then the official weights copied in.
    The architecture is the checkpoint's own (its config and tensor shapes); the flags only fill in
    what it does not say (avhubert.resolve_avhubert_config)."""
    from .avhubert import convert_official_state_dict, read_official_checkpoint, resolve_avhubert_config
    from .loading import load_state_dict_exact

    if cfg.avhubert_path is None:
        av_cfg = AVHubertConfig(layers=cfg.tiny.avhubert_layers, width=cfg.tiny.avhubert_width,
                                heads=cfg.tiny.avhubert_heads, ffn=cfg.tiny.avhubert_ffn,
                                resnet_channels=cfg.tiny.avhubert_resnet_channels, conv_pos=16, conv_pos_groups=4,
                                layer_norm_first=cfg.avhubert_layer_norm_first is not False)
        with init_ctx():
            return AVHubertVideoEncoder(av_cfg)
    official = read_official_checkpoint(cfg.avhubert_path)
    av_cfg = resolve_avhubert_config(official, heads=cfg.avhubert_attention_heads,
                                     layer_norm_first=cfg.avhubert_layer_norm_first)
    with init_ctx():
        encoder = AVHubertVideoEncoder(av_cfg)
    load_state_dict_exact(encoder, convert_official_state_dict(official.state), what=official.describe())
    return encoder


def _add_video_lora(encoder: AVHubertVideoEncoder, cfg: ModelConfig) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=r"encoder\.layers\.\d+\.attn\.(q_proj|v_proj)", bias="none")
    inject_adapter_in_model(lora, encoder)
    for name, p in encoder.named_parameters():
        p.requires_grad_("lora_" in name)


@torch.no_grad()
def _delimiter_table(llm, specials: SpecialTokenIds, init_ctx=nullcontext) -> nn.Embedding:
    """[4, D] trainable copy of the delimiter rows of the LLM's (frozen) input embedding."""
    table = llm.get_input_embeddings()
    with init_ctx():
        delimiters = nn.Embedding(4, table.embedding_dim)
    rows = list(specials.delimiters)
    from .loading import is_partitioned

    if is_partitioned(table) or is_partitioned(delimiters):
        import deepspeed

        with deepspeed.zero.GatheredParameters([table.weight, delimiters.weight], modifier_rank=0):
            delimiters.weight.copy_(table.weight[rows].float())
    else:
        delimiters.weight.copy_(table.weight[rows].float())
    return delimiters


def build_model(cfg: ModelConfig, ds_config: dict | None = None, tokenizer=None) -> LlamaAVSR:
    """Build the full model (`tokenizer`: build_tokenizer(cfg) when not given; the model keeps only its
    ids). With a ZeRO-3 `ds_config`: the LLM is partitioned while it loads (an HfDeepSpeedConfig is
    kept alive on the model), this project's modules (AV-HuBERT, projectors, delimiter table) are
    created under deepspeed.zero.Init and AV-HuBERT's weights copied in one module at a time; the
    Whisper encoder alone is read whole (encoder tensors only) and partitioned right away."""
    from .llm import load_llm

    hf_ds_config, init_ctx = None, nullcontext
    if _is_zero3(ds_config):
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)     # must outlive from_pretrained: transformers holds a weakref

        def init_ctx():                                  # a fresh zero.Init context per use
            return deepspeed.zero.Init(config_dict_or_path=ds_config)

    tokenizer = build_tokenizer(cfg) if tokenizer is None else tokenizer
    prompt = prompt_ids(tokenizer, cfg.modality)
    llm = load_llm(cfg, len(tokenizer), prompt.specials)
    audio_encoder = build_audio_encoder(cfg, ds_config) if cfg.uses_audio else None
    video_encoder = build_video_encoder(cfg, init_ctx) if cfg.uses_video else None
    model = assemble_model(cfg, prompt, llm, audio_encoder, video_encoder, init_ctx)
    cast_trainable(model, training_dtype(ds_config))
    model.hf_ds_config = hf_ds_config
    return model


def training_dtype(ds_config: dict | None) -> torch.dtype:
    """The dtype DeepSpeed computes in: bf16 (or fp16) when the resolved config enables it, else fp32."""
    enabled = (lambda section: bool((ds_config or {}).get(section, {}).get("enabled", False)))
    return torch.bfloat16 if enabled("bf16") else torch.float16 if enabled("fp16") else torch.float32


@torch.no_grad()
def cast_trainable(model: nn.Module, dtype: torch.dtype) -> None:
    """Every trainable parameter in `dtype`, the one dtype DeepSpeed's flat buffers need (its optimizer
    keeps the fp32 master copy and moments). Modules built under zero.Init already are; the LoRA adapters
    are not: peft creates them outside it and, by default, upcasts them to fp32. Frozen parts keep their
    load dtype (--model.load-dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)
    dtypes: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:       # a partitioned parameter's dtype is its partition's
            dtypes.setdefault(p.dtype, []).append(name)
    if len(dtypes) > 1:
        raise RuntimeError("trainable parameters in several dtypes (DeepSpeed needs one): "
                           + "; ".join(f"{d}: {names[:3]}" for d, names in dtypes.items()))


def assemble_model(cfg: ModelConfig, prompt: PromptIds, llm, audio_encoder: WhisperAudioEncoder | None,
                   video_encoder: AVHubertVideoEncoder | None, init_ctx=nullcontext) -> LlamaAVSR:
    """LlamaAVSR from its built parts (a frozen causal LM, frozen encoders): the trainer's freezing and
    LoRA, the projectors and the delimiter table. bench/estimate_lrs3.py calls it on the meta device
    with parts built from configs at the paper's sizes. LoRA adapters are added outside zero.Init;
    deepspeed.initialize partitions them."""
    from .llm import add_lora

    d_llm = llm.config.hidden_size
    if video_encoder is not None:
        video_encoder.requires_grad_(not cfg.freeze_video_encoder)
        if cfg.video_lora:
            _add_video_lora(video_encoder, cfg)

    def projector(in_dim: int, rate: int) -> Projector:
        with init_ctx():
            return Projector(in_dim, d_llm, rate, cfg.downsample, cfg.projector_hidden, cfg.prefusion_layernorm)

    audio_projector = projector(audio_encoder.out_dim, cfg.audio_rate) if audio_encoder is not None else None
    video_projector = projector(video_encoder.out_dim, cfg.video_rate) if video_encoder is not None else None
    delimiters = _delimiter_table(llm, prompt.specials, init_ctx)
    delimiters.requires_grad_(not cfg.freeze_delimiters)
    llm = add_lora(llm, cfg)
    return LlamaAVSR(cfg, prompt, llm, audio_encoder, video_encoder, audio_projector, video_projector, delimiters)
