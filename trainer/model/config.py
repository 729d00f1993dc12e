"""Configuration of the Llama-AVSR model (encoders, projectors, LLM, LoRA, decorrelation loss).

Every pretrained part is optional: a `None` path builds a tiny, randomly initialised stand-in
from the `tiny_*` sizes, so the whole model runs on a CPU in tests and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("asr", "vsr", "avsr")
DOWNSAMPLE_MODES = ("stack", "avgpool")
DECORRELATION_IMPLS = ("auto", "triton", "torch")
LOAD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    modality: str = "avsr"
    """"asr" (audio only: Whisper), "vsr" (video only: AV-HuBERT) or "avsr" (both)."""

    # --- pretrained parts (local only: nothing is ever downloaded) ---
    llm_path: str | None = None
    """Local folder of a transformers causal LM (Llama 3.x); None -> tiny LlamaConfig built in code."""
    tokenizer_path: str | None = None
    """Local tokenizer folder; None -> the LLM folder's tokenizer, or (tiny LLM) a character-level
    tokenizer built in code. `trainer.model.tokenizer.train_bpe_tokenizer` writes a corpus BPE one."""
    tiny_tokenizer: str = "bpe"
    """Tokenizer for the tiny LLM when no tokenizer_path is given: "bpe" (trained by the trainer on
    the training transcripts, saved in the run folder) or "char" (character level, no corpus needed)."""
    tiny_tokenizer_vocab: int = 400
    """Vocabulary size of the corpus BPE tokenizer."""
    whisper_path: str | None = None
    """Local folder of a Whisper checkpoint (WhisperModel / WhisperForConditionalGeneration);
    None -> tiny WhisperConfig built in code."""
    avhubert_path: str | None = None
    """Official AV-HuBERT fairseq checkpoint (.pt); None -> tiny AV-HuBERT built in code."""
    load_dtype: str = "float32"
    """dtype the pretrained parts are loaded in ("bfloat16" on GPUs); tiny parts are built in fp32."""
    llm_attn_implementation: str = "sdpa"
    """transformers attention backend for the LLM ("sdpa", "eager", "flash_attention_2")."""
    llm_gradient_checkpointing: bool = False
    """Recompute LLM decoder blocks in the backward pass (saves activation memory)."""

    # --- tiny stand-ins (used only when the matching path is None) ---
    n_mels: int = 80
    """Mel bins of the tiny Whisper (a pretrained Whisper uses its own num_mel_bins: 80, or 128 for large-v3)."""
    tiny_llm_layers: int = 4
    """Decoder layers of the tiny Llama."""
    tiny_llm_width: int = 128
    """Hidden size of the tiny Llama."""
    tiny_llm_heads: int = 4
    """Attention heads of the tiny Llama (2 key/value heads when divisible: grouped-query attention as in Llama 3)."""
    tiny_llm_ffn: int = 256
    """MLP intermediate size of the tiny Llama."""
    tiny_llm_init_std: float = 0.1
    """Init std of the tiny Llama (transformers' default is 0.02). The LLM stays frozen, and with 0.02
    a random RMS-normed output head caps logits near +-1, so the LoRA model could barely learn."""
    tiny_whisper_layers: int = 2
    """Encoder layers of the tiny Whisper."""
    tiny_whisper_width: int = 64
    """d_model of the tiny Whisper."""
    tiny_whisper_heads: int = 2
    """Attention heads of the tiny Whisper."""
    tiny_whisper_init_std: float = 0.3
    """Init std of the tiny Whisper's weights. With transformers' default (0.02) its frozen random
    convolutions pass on a speech signal ~1.5% of the sinusoidal position table, so the projector
    sees mostly position and the demo model never learns to listen; at 0.3 the content is ~60%."""
    tiny_whisper_max_source_positions: int = 500
    """Encoder frames of the tiny Whisper (x2 mel frames = its fixed input window; 500 -> 10 s).
    Longer clips raise: filter them in the data pipeline."""
    tiny_avhubert_layers: int = 2
    """Transformer layers of the tiny AV-HuBERT."""
    tiny_avhubert_width: int = 64
    """Transformer width of the tiny AV-HuBERT."""
    tiny_avhubert_heads: int = 2
    """Attention heads of the tiny AV-HuBERT."""
    tiny_avhubert_ffn: int = 128
    """FFN size of the tiny AV-HuBERT."""
    tiny_avhubert_resnet_channels: int = 4
    """First ResNet stage width of the tiny AV-HuBERT (official: 64; stages are x1, x2, x4, x8).
    The frozen video front end is most of a CPU step: 4 channels cost ~0.8 s per 1500 frames, 8 ~1.4 s."""
    avhubert_layer_norm_first: bool = True
    """Pre-LN Transformer layers (True for the released AV-HuBERT Base and Large checkpoints)."""

    # --- projectors ---
    audio_rate: int = 3
    """Whisper frames (50 Hz) merged per audio token: 3 -> 16.7 tokens/s. Literature: 3, 4, 16, 32."""
    video_rate: int = 2
    """AV-HuBERT frames (25 Hz) merged per video token: 2 -> 12.5 tokens/s. Literature: 2, 3, 5."""
    downsample: str = "stack"
    """"stack": concatenate k consecutive frames; "avgpool": average them (kernel = stride = k)."""
    projector_hidden: int = 2048
    """Hidden width of the two-layer projector MLP."""
    prefusion_layernorm: bool = False
    """Add LayerNorm(d_llm) after each projector ("pre-fusion LayerNorm", used with the decorrelation loss)."""

    # --- LoRA (the LLM base is frozen) ---
    lora_r: int = 8
    """LoRA rank (the paper's exact value is not stated here; 8 is a common choice)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch input."""
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """LLM linear layers that get LoRA adapters."""

    # --- video encoder training ---
    freeze_video_encoder: bool = True
    """Keep AV-HuBERT frozen (False: fine-tune all of it; BatchNorm statistics stay frozen either way)."""
    video_lora: bool = False
    """LoRA (same r/alpha/dropout as the LLM) on AV-HuBERT attention q/v; the rest stays frozen."""

    # --- decorrelation loss (DESIGN.md section 3) ---
    decorrelation_weight: float = 0.0
    """lambda: total loss = CE + lambda * L_dec_raw. 0 turns the loss off (the public code used 1e4)."""
    decorrelation_layers: tuple[int, ...] | None = None
    """Indices into the LLM's `hidden_states` (0 = embeddings, i = output of block i, L = final normed);
    None -> 1 .. L-1."""
    decorrelation_impl: str = "auto"
    """Kernel choice passed to trainer.kernels.decorrelation_loss: "auto", "triton" or "torch"."""
    measure_decorrelation_when_off: bool = True
    """With lambda = 0, still compute L_dec_raw (no grad) so baseline runs log it for comparison."""

    # --- prompt ---
    modality_order: tuple[str, ...] = ("audio", "video")
    """Order of the modality blocks after BOS. Default: the paper's (Llama-AVSR's `prepare_inputs`, DESIGN.md
    section 1): BOS, <audio> A.. </audio>, <video> V.. </video>, instruction. ("video", "audio") puts video
    first. The delimiter right after BOS is the one that tends to become an intermediate sink. Only enabled
    modalities are placed; the order of the others is ignored."""
    whisper_pad_to_30s: bool = True
    """Pad the mel input to the encoder's fixed window (30 s for real Whisper, 2 x max_source_positions
    frames in general) and keep only the real frames of the output: real checkpoints are trained on
    30 s windows and transformers' WhisperEncoder refuses other lengths. False: run the encoder at the
    batch's own length (re-implemented forward; faster, but off the pretraining distribution)."""

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        self.modality_order = tuple(self.modality_order)
        if self.decorrelation_layers is not None:
            self.decorrelation_layers = tuple(int(i) for i in self.decorrelation_layers)
        errors = self.validation_errors()
        if errors:
            raise ValueError("invalid ModelConfig:\n  - " + "\n  - ".join(errors))

    def validation_errors(self) -> list[str]:
        errors: list[str] = []
        if self.modality not in MODALITIES:
            errors.append(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.tiny_tokenizer not in ("bpe", "char"):
            errors.append(f"tiny_tokenizer must be 'bpe' or 'char', got {self.tiny_tokenizer!r}")
        if self.downsample not in DOWNSAMPLE_MODES:
            errors.append(f"downsample must be one of {DOWNSAMPLE_MODES}, got {self.downsample!r}")
        if self.decorrelation_impl not in DECORRELATION_IMPLS:
            errors.append(f"decorrelation_impl must be one of {DECORRELATION_IMPLS}, got {self.decorrelation_impl!r}")
        if self.load_dtype not in LOAD_DTYPES:
            errors.append(f"load_dtype must be one of {LOAD_DTYPES}, got {self.load_dtype!r}")
        if sorted(self.modality_order) != ["audio", "video"]:
            errors.append(f"modality_order must be a permutation of ('video', 'audio'), got {self.modality_order}")
        for name in ("audio_rate", "video_rate", "projector_hidden", "lora_r", "n_mels",
                     "tiny_llm_layers", "tiny_llm_width", "tiny_llm_heads", "tiny_llm_ffn",
                     "tiny_whisper_layers", "tiny_whisper_width", "tiny_whisper_heads",
                     "tiny_whisper_max_source_positions", "tiny_avhubert_layers", "tiny_avhubert_width",
                     "tiny_avhubert_heads", "tiny_avhubert_ffn", "tiny_avhubert_resnet_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name} must be a positive int, got {value!r}")
        for width, heads in (("tiny_llm_width", "tiny_llm_heads"), ("tiny_whisper_width", "tiny_whisper_heads"),
                             ("tiny_avhubert_width", "tiny_avhubert_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            if isinstance(w, int) and isinstance(h, int) and h > 0 and w % h:
                errors.append(f"{width}={w} is not divisible by {heads}={h}")
        if isinstance(self.tiny_avhubert_width, int) and self.tiny_avhubert_width % 4:
            errors.append(f"tiny_avhubert_width={self.tiny_avhubert_width} must be divisible by 4 "
                          "(groups of its convolutional positional embedding)")
        if not self.tiny_llm_init_std > 0:
            errors.append(f"tiny_llm_init_std must be > 0, got {self.tiny_llm_init_std}")
        if not 0.0 <= self.lora_dropout < 1.0:
            errors.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets:
            errors.append("lora_targets is empty: the LLM would have no trainable adapters")
        if self.decorrelation_weight < 0:
            errors.append(f"decorrelation_weight must be >= 0, got {self.decorrelation_weight}")
        if self.decorrelation_layers is not None:
            if not self.decorrelation_layers:
                errors.append("decorrelation_layers is empty (use None for the default 1 .. L-1)")
            if any(i < 0 for i in self.decorrelation_layers):
                errors.append(f"decorrelation_layers must be non-negative, got {self.decorrelation_layers}")
            if len(set(self.decorrelation_layers)) != len(self.decorrelation_layers):
                errors.append(f"decorrelation_layers has duplicates: {self.decorrelation_layers}")
        if self.video_lora and not self.freeze_video_encoder:
            errors.append("video_lora=True needs freeze_video_encoder=True (LoRA adapts a frozen encoder)")
        if self.video_lora and not self.uses_video:
            errors.append("video_lora=True but modality is 'asr' (no video encoder)")
        return errors

    @property
    def uses_audio(self) -> bool:
        return self.modality in ("asr", "avsr")

    @property
    def uses_video(self) -> bool:
        return self.modality in ("vsr", "avsr")

    @property
    def enabled_modalities(self) -> tuple[str, ...]:
        """Enabled modalities in prompt order."""
        enabled = {"audio": self.uses_audio, "video": self.uses_video}
        return tuple(m for m in self.modality_order if enabled[m])
