"""Configuration of the Llama-AVSR model (encoders, projectors, LLM, LoRA, decorrelation loss).

Every pretrained part is optional: a `None` path builds a tiny, randomly initialised stand-in
with the sizes in `ModelConfig.tiny` (`--model.tiny.llm-layers`, ...), so the whole model runs on a
CPU in tests and the demo.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from trainer.config_checks import Problems
from trainer.data.config import Streams

MODALITIES = ("asr", "vsr", "avsr")
DOWNSAMPLE_MODES = ("stack", "avgpool")
DECORRELATION_IMPLS = ("auto", "triton", "torch")
LOAD_DTYPES = ("float32", "bfloat16", "float16")
TINY_TOKENIZERS = ("bpe", "char")


@dataclass
class TinyModelConfig:
    """Sizes of the tiny stand-ins, each used only when the matching pretrained path is None."""

    tokenizer: str = "bpe"
    """Tokenizer for the tiny LLM when no tokenizer_path is given: "bpe" (trained by the trainer on
    the training transcripts, saved in the run folder) or "char" (character level, no corpus needed)."""
    tokenizer_vocab: int = 400
    """Vocabulary size of the corpus BPE tokenizer."""
    llm_layers: int = 4
    """Decoder layers of the tiny Llama."""
    llm_width: int = 128
    """Hidden size of the tiny Llama."""
    llm_heads: int = 4
    """Attention heads of the tiny Llama (2 key/value heads when divisible: grouped-query attention as in Llama 3)."""
    llm_ffn: int = 256
    """MLP intermediate size of the tiny Llama."""
    llm_init_std: float = 0.1
    """Init std of the tiny Llama (transformers' default is 0.02). The LLM stays frozen, and with 0.02
    a random RMS-normed output head caps logits near +-1, so the LoRA model could barely learn."""
    n_mels: int = 80
    """Mel bins of the tiny Whisper, and so of the log-mels the data pipeline computes for it (a
    pretrained Whisper uses its own num_mel_bins: 80, or 128 for large-v3)."""
    whisper_layers: int = 2
    """Encoder layers of the tiny Whisper."""
    whisper_width: int = 64
    """d_model of the tiny Whisper."""
    whisper_heads: int = 2
    """Attention heads of the tiny Whisper."""
    whisper_init_std: float = 0.3
    """Init std of the tiny Whisper's weights. With transformers' default (0.02) its frozen random
    convolutions pass on a speech signal ~1.5% of the sinusoidal position table, so the projector
    sees mostly position and the demo model never learns to listen; at 0.3 the content is ~60%."""
    whisper_max_source_positions: int = 500
    """Encoder frames of the tiny Whisper (x2 mel frames = its fixed input window; 500 -> 10 s).
    Longer clips raise: filter them in the data pipeline."""
    avhubert_layers: int = 2
    """Transformer layers of the tiny AV-HuBERT."""
    avhubert_width: int = 64
    """Transformer width of the tiny AV-HuBERT."""
    avhubert_heads: int = 2
    """Attention heads of the tiny AV-HuBERT."""
    avhubert_ffn: int = 128
    """FFN size of the tiny AV-HuBERT."""
    avhubert_resnet_channels: int = 4
    """First ResNet stage width of the tiny AV-HuBERT (official: 64; stages are x1, x2, x4, x8).
    The frozen video front end is most of a CPU step: 4 channels cost ~0.8 s per 1500 frames, 8 ~1.4 s."""

    def __post_init__(self) -> None:
        p = Problems("model.tiny")
        p.one_of(self, "tokenizer", TINY_TOKENIZERS)
        p.at_least(self, [f.name for f in fields(self) if f.type in ("int", int)], 1, integer=True)
        for width, heads in (("llm_width", "llm_heads"), ("whisper_width", "whisper_heads"),
                             ("avhubert_width", "avhubert_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            if isinstance(w, int) and isinstance(h, int) and h > 0:
                p.check(w % h == 0, width, f"({w}) must be divisible by {p.flag(heads)} ({h})")
        if isinstance(self.avhubert_width, int):
            p.check(self.avhubert_width % 4 == 0, "avhubert_width", f"({self.avhubert_width}) must be divisible "
                    "by 4 (groups of its convolutional positional embedding)")
        p.check(self.llm_init_std > 0, "llm_init_std", f"must be > 0, got {self.llm_init_std}")
        p.check(self.whisper_init_std > 0, "whisper_init_std", f"must be > 0, got {self.whisper_init_std}")
        p.raise_any()


@dataclass
class ModelConfig:
    modality: str = "avsr"
    """"asr" (audio only: Whisper), "vsr" (video only: AV-HuBERT) or "avsr" (both). The data pipeline
    decodes what this needs (`input_streams`): there is no data-side modality."""

    # --- pretrained parts: hub names or local folders (trainer/model/hub.py) ---
    llm_path: str | None = None
    """A transformers causal LM (Llama 3.x): a hub name (meta-llama/Llama-3.2-1B, through the Hugging Face
    cache; HF_HUB_OFFLINE=1 reads the cache only) or a local folder; None -> tiny LlamaConfig built in code."""
    llm_revision: str | None = None
    """Branch, tag or commit of a hub-name llm_path (None: main). The run pins the commit it resolved."""
    tokenizer_path: str | None = None
    """Tokenizer, hub name or folder; None -> the LLM's tokenizer, or (tiny LLM) a character-level
    tokenizer built in code. `trainer.model.tokenizer.train_bpe_tokenizer` writes a corpus BPE one."""
    whisper_path: str | None = None
    """A Whisper checkpoint (WhisperModel / WhisperForConditionalGeneration): a hub name
    (openai/whisper-medium.en) or a local folder; None -> tiny WhisperConfig built in code."""
    whisper_revision: str | None = None
    """Branch, tag or commit of a hub-name whisper_path (None: main). The run pins the commit it resolved."""
    avhubert_path: str | None = None
    """Official AV-HuBERT fairseq checkpoint (.pt); None -> tiny AV-HuBERT built in code."""
    load_dtype: str = "float32"
    """dtype the pretrained parts are loaded in ("bfloat16" on GPUs); tiny parts are built in fp32."""
    llm_attn_implementation: str = "sdpa"
    """transformers attention backend for the LLM ("sdpa", "eager", "flash_attention_2")."""
    llm_gradient_checkpointing: bool = False
    """Recompute LLM decoder blocks in the backward pass (saves activation memory)."""

    avhubert_layer_norm_first: bool | None = None
    """Pre-LN Transformer layers. None: the checkpoint's own `layer_norm_first` (True in the released
    Base and Large; True when a file carries no config; True for the tiny AV-HuBERT). A value the
    checkpoint's config contradicts is refused."""
    avhubert_attention_heads: int | None = None
    """Attention heads of a checkpoint's AV-HuBERT (fairseq's `encoder_attention_heads`). None: the
    file's own (width / 64 when the file carries no config, as in both releases). A value its config
    contradicts is refused. The tiny AV-HuBERT takes --model.tiny.avhubert-heads."""

    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Sizes of the tiny stand-ins (`--model.tiny.llm-layers 2`; recipe `model: {tiny: {llm_layers: 2}}`)."""

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
    freeze_delimiters: bool = False
    """Keep the embeddings of <audio> </audio> <video> </video> at their initial values (the paper's
    code trains only the projectors and LoRA: the mini and LRS3 recipes set it); False trains the
    [4, D] delimiter table (the demo, whose tiny LLM's rows are random)."""

    # --- video encoder training ---
    freeze_video_encoder: bool = True
    """Keep AV-HuBERT frozen (False: fine-tune all of it; BatchNorm statistics stay frozen either way)."""
    video_lora: bool = False
    """LoRA (same r/alpha/dropout as the LLM) on AV-HuBERT attention q/v; the rest stays frozen."""

    # --- decorrelation loss (DESIGN.md section 3) ---
    decorrelation_weight: float = 0.0
    """lambda: total loss = CE + lambda * L_dec_raw. 0 turns the loss off (the public code used 1e4)."""
    decorrelation_warmup_steps: int = 0
    """Ramp lambda linearly over the first N optimizer steps (step s trains with lambda * min(1, (s + 1) / N));
    0 = the full lambda from the first step, as the paper's code. A ramp lets the cross-entropy shape the
    model before the decorrelation term can dominate it."""
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
        if isinstance(self.tiny, dict):                 # a recipe or a saved run's JSON
            self.tiny = TinyModelConfig(**self.tiny)
        self.lora_targets = tuple(self.lora_targets)
        self.modality_order = tuple(self.modality_order)
        if self.decorrelation_layers is not None:
            self.decorrelation_layers = tuple(int(i) for i in self.decorrelation_layers)
        p = Problems("model")
        p.one_of(self, "modality", MODALITIES)
        p.one_of(self, "downsample", DOWNSAMPLE_MODES)
        p.one_of(self, "decorrelation_impl", DECORRELATION_IMPLS)
        p.one_of(self, "load_dtype", LOAD_DTYPES)
        p.check(sorted(self.modality_order) == ["audio", "video"], "modality_order",
                f"must be a permutation of (audio, video), got {self.modality_order}")
        p.at_least(self, ("audio_rate", "video_rate", "projector_hidden", "lora_r", "lora_alpha"), 1, integer=True)
        if self.avhubert_attention_heads is not None:
            p.at_least(self, ("avhubert_attention_heads",), 1, integer=True)
        p.check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        p.check(bool(self.lora_targets), "lora_targets", "is empty: the LLM would have no trainable adapters")
        p.check(self.decorrelation_weight >= 0, "decorrelation_weight",
                f"must be >= 0, got {self.decorrelation_weight}")
        p.at_least(self, ("decorrelation_warmup_steps",), 0, integer=True)
        layers = self.decorrelation_layers
        if layers is not None:
            p.check(bool(layers), "decorrelation_layers", "is empty (leave it out for the default 1 .. L-1)")
            p.check(all(i >= 0 for i in layers), "decorrelation_layers", f"must be non-negative, got {layers}")
            p.check(len(set(layers)) == len(layers), "decorrelation_layers", f"has duplicates: {layers}")
        if self.video_lora:
            p.check(self.freeze_video_encoder, "video_lora",
                    f"needs {p.flag('freeze_video_encoder')} True (LoRA adapts a frozen encoder)")
            p.check(self.uses_video, "video_lora", f"needs video, but {p.flag('modality')} is {self.modality!r}")
        p.raise_any()

    @property
    def uses_audio(self) -> bool:
        return self.modality in ("asr", "avsr")

    @property
    def uses_video(self) -> bool:
        return self.modality in ("vsr", "avsr")

    def streams(self, n_mels: int | None = None) -> Streams:
        """What the data pipeline decodes for this model. n_mels: its Whisper's mel bins (a pretrained
        checkpoint's num_mel_bins, which `LlamaAVSR.input_streams` passes); None: the tiny Whisper's."""
        return Streams(audio=self.uses_audio, video=self.uses_video,
                       n_mels=self.tiny.n_mels if n_mels is None else n_mels)

    @property
    def enabled_modalities(self) -> tuple[str, ...]:
        """Enabled modalities in prompt order."""
        enabled = {"audio": self.uses_audio, "video": self.uses_video}
        return tuple(m for m in self.modality_order if enabled[m])
