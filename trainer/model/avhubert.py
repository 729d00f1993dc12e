"""AV-HuBERT video encoder (video-only path), and loading of the official fairseq checkpoints.

Architecture (Shi et al. 2022, facebookresearch/av_hubert), as run by its `extract_finetune`
with audio=None:
  video [B, T, H, W] (normalised grayscale mouth crops, 25 fps)
  -> 3-D conv stem: Conv3d(1->C, k=(5,7,7), s=(1,2,2), p=(2,3,3)) -> BN -> PReLU -> MaxPool3d
  -> per-frame ResNet-18 trunk (BasicBlocks with PReLU, widths C, 2C, 4C, 8C) -> global avg pool
  -> Linear(8C, D)                                   ("feature_extractor_video.proj")
  -> concat [zeros (absent audio), video] -> LayerNorm(2D) -> Linear(2D, D)
     (the official model fuses modalities by concatenation and zero-fills a missing one)
  -> Transformer encoder: x += GELU(weight-normed grouped Conv1d(x)) positional embedding,
     then pre-LN (Large/Base releases) or post-LN layers, final LayerNorm.
The output keeps the 25 Hz frame rate: [B, T, D]. Official sizes: C = 64; Large D = 1024,
24 layers, 16 heads, FFN 4096; Base D = 768, 12 layers, 12 heads, FFN 3072.

Module names here are descriptive; `OFFICIAL_TO_LOCAL` is the single documented key mapping.
What a checkpoint file holds is read, never assumed: the architecture from its own fairseq config
(omegaconf `cfg` or argparse `args`, also a fine-tuned file's `w2v_args`) checked against its tensor
shapes; pretrained, fine-tuned seq2seq and CTC layouts; weight norm stored either way.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .projector import frame_mask


@dataclass
class AVHubertConfig:
    layers: int = 24
    """Transformer encoder layers."""
    width: int = 1024
    """Transformer width D."""
    heads: int = 16
    """Attention heads."""
    ffn: int = 4096
    """Feed-forward inner size."""
    resnet_channels: int = 64
    """Width C of the stem and first ResNet stage; the trunk ends at 8C (512 officially)."""
    conv_pos: int = 128
    """Kernel size of the convolutional positional embedding."""
    conv_pos_groups: int = 16
    """Groups of the convolutional positional embedding."""
    layer_norm_first: bool = True
    """Pre-LN layers (True in the released checkpoints)."""
    fuse: str = "concat"
    """How the official model fuses audio and video features: "concat" (released models) or "add"."""
    dropout: float = 0.0
    """Dropout in the Transformer (the encoder normally runs frozen in eval mode)."""

    @classmethod
    def large(cls) -> "AVHubertConfig":
        return cls(layers=24, width=1024, heads=16, ffn=4096)

    @classmethod
    def base(cls) -> "AVHubertConfig":
        return cls(layers=12, width=768, heads=12, ffn=3072)

    @property
    def frame_dim(self) -> int:
        return 8 * self.resnet_channels


# ----------------------------------------------------------------------------- ResNet front end

class _Fp32BatchNorm:
    """BatchNorm computed in fp32 whatever its tensors are stored in. Under bf16 DeepSpeed casts
    parameters but not buffers (ZeRO-2 keeps the checkpoint's fp32 running statistics) or creates
    everything in bf16 (zero.Init, ZeRO-3); either way the statistics meet bf16 activations, and a
    variance in bf16 keeps 3 significant digits. Same idea as fairseq's Fp32GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        mean, var = self.running_mean, self.running_var
        mean32 = var32 = None
        if self.track_running_stats:
            mean32, var32 = mean.float(), var.float()
        momentum = self.momentum or 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:       # cumulative moving average, as torch's BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(x.float(), mean32, var32, None if self.weight is None else self.weight.float(),
                         None if self.bias is None else self.bias.float(), use_batch_stats, momentum, self.eps)
        if self.training and self.track_running_stats and mean32 is not mean:
            mean.copy_(mean32)              # the statistics were updated in the fp32 copies
            var.copy_(var32)
        return y.to(x.dtype)


class BatchNorm2d(_Fp32BatchNorm, nn.BatchNorm2d):
    pass


class BatchNorm3d(_Fp32BatchNorm, nn.BatchNorm3d):
    pass


class Stem3D(nn.Module):
    """Spatio-temporal stem: keeps T, reduces H and W by 4."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(1, channels, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False)
        self.norm = BatchNorm3d(channels)
        self.act = nn.PReLU(channels)
        self.pool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class Shortcut(nn.Module):
    """1x1 strided conv + BN on the residual path where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)
        self.norm = BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = BatchNorm2d(out_ch)
        self.act1 = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = BatchNorm2d(out_ch)
        self.act2 = nn.PReLU(out_ch)
        self.shortcut = Shortcut(in_ch, out_ch, stride) if (stride != 1 or in_ch != out_ch) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + residual)


class ResNetTrunk(nn.Module):
    """ResNet-18 body (2 BasicBlocks per stage) applied to each frame, pooled to an 8C vector."""

    def __init__(self, channels: int):
        super().__init__()
        widths = [channels, 2 * channels, 4 * channels, 8 * channels]
        in_ch = channels
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            self.add_module(f"stage{i}", nn.Sequential(BasicBlock(in_ch, width, stride), BasicBlock(width, width, 1)))
            in_ch = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------- Transformer encoder

class ConvPositionalEmbedding(nn.Module):
    """GELU(grouped Conv1d(x)) with weight normalisation over dim 2, stored as (weight_g, weight_v)
    exactly as the checkpoint does (fairseq applied torch weight_norm(dim=2))."""

    def __init__(self, width: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        std = (4.0 / (kernel * width)) ** 0.5
        self.weight_v = nn.Parameter(torch.randn(width, width // groups, kernel) * std)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(self.weight_v.detach(), dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(width))

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:            # an even kernel yields T + 1 frames: drop the last ("same" length)
            y = y[..., :-1]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attend = ~padding_mask[:, None, None, :]                               # keys only
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.attn = SelfAttention(cfg.width, cfg.heads, cfg.dropout)
        self.attn_norm = nn.LayerNorm(cfg.width)
        self.ffn_in = nn.Linear(cfg.width, cfg.ffn)
        self.ffn_out = nn.Linear(cfg.ffn, cfg.width)
        self.ffn_norm = nn.LayerNorm(cfg.width)
        self.drop = nn.Dropout(cfg.dropout)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.ffn_out(F.gelu(self.ffn_in(x))))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.drop(self.attn(self.attn_norm(x), padding_mask))
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.drop(self.attn(x, padding_mask)))
        return self.ffn_norm(x + self.ffn(x))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.pos_conv = ConvPositionalEmbedding(cfg.width, cfg.conv_pos, cfg.conv_pos_groups)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        # Pre-LN: applied after the last layer. Post-LN: applied to the input, before the first layer.
        self.final_norm = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.final_norm(x)
        for layer in self.layers:
            x = layer(x, padding_mask)
        return self.final_norm(x) if self.layer_norm_first else x


# ----------------------------------------------------------------------------- the video encoder

class AVHubertVideoEncoder(nn.Module):
    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        if cfg.fuse not in ("concat", "add"):
            raise ValueError(f"unknown AV-HuBERT fuse mode {cfg.fuse!r}")
        self.cfg = cfg
        self.stem = Stem3D(cfg.resnet_channels)
        self.trunk = ResNetTrunk(cfg.resnet_channels)
        self.frame_proj = nn.Linear(cfg.frame_dim, cfg.width)
        fused = 2 * cfg.width if cfg.fuse == "concat" else cfg.width
        self.fusion_norm = nn.LayerNorm(fused)
        self.fusion_proj = nn.Linear(fused, cfg.width) if cfg.fuse == "concat" else None
        self.encoder = TransformerEncoder(cfg)

    @property
    def out_dim(self) -> int:
        return self.cfg.width

    def frame_features(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, H, W] -> [B, T, D]: the per-frame visual front end."""
        B, T = video.shape[:2]
        x = self.stem(video.unsqueeze(1))                                   # [B, C, T, h, w]
        C, h, w = x.shape[1], x.shape[3], x.shape[4]
        # frames through the 2-D trunk, channels-last: oneDNN's fast layout (the frozen trunk took
        # ~1.6x the CPU time in the default layout; bench/profile_step.py)
        x = x.transpose(1, 2).reshape(B * T, C, h, w).contiguous(memory_format=torch.channels_last)
        x = self.trunk(x).view(B, T, -1)
        return self.frame_proj(x)

    def forward(self, video: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, T, H, W], lengths [B] (frames) -> (features [B, T, D] at 25 Hz, lengths)."""
        if video.dim() != 4:
            raise ValueError(f"video must be [B, T, H, W], got shape {tuple(video.shape)}")
        real = frame_mask(lengths, video.shape[1], video.device)
        # Zero the padded frames: the stem's temporal kernel reaches 2 frames past a clip's end, and
        # zeros are what a clip padded alone (or the official collater) would show it.
        video = video.to(self.frame_proj.weight.dtype) * real[:, :, None, None]
        return self.contextualise(self.frame_features(video), real), lengths

    def contextualise(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Per-frame features [B, T, D] and the real-frame mask [B, T] -> the Transformer's output."""
        if self.cfg.fuse == "concat":                                       # [audio = zeros, video]
            x = torch.cat([torch.zeros_like(x), x], dim=-1)
        x = self.fusion_norm(x)
        if self.fusion_proj is not None:
            x = self.fusion_proj(x)
        return self.encoder(x, ~real)


# ----------------------------------------------------------------------------- official checkpoint keys

# Official module path (fairseq AVHubertModel) -> module path here. The parameter / buffer name
# after the last dot (weight, bias, running_mean, running_var, num_batches_tracked, weight_g,
# weight_v) is the same on both sides. {s}: ResNet stage 1-4, {b}: block 0-1, {n}: layer index.
OFFICIAL_TO_LOCAL: tuple[tuple[str, str], ...] = (
    ("feature_extractor_video.resnet.frontend3D.0", "stem.conv"),
    ("feature_extractor_video.resnet.frontend3D.1", "stem.norm"),
    ("feature_extractor_video.resnet.frontend3D.2", "stem.act"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.conv1", "trunk.stage{s}.{b}.conv1"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.bn1", "trunk.stage{s}.{b}.norm1"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.relu1", "trunk.stage{s}.{b}.act1"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.conv2", "trunk.stage{s}.{b}.conv2"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.bn2", "trunk.stage{s}.{b}.norm2"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.relu2", "trunk.stage{s}.{b}.act2"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.downsample.0", "trunk.stage{s}.{b}.shortcut.conv"),
    ("feature_extractor_video.resnet.trunk.layer{s}.{b}.downsample.1", "trunk.stage{s}.{b}.shortcut.norm"),
    ("feature_extractor_video.proj", "frame_proj"),
    ("layer_norm", "fusion_norm"),
    ("post_extract_proj", "fusion_proj"),
    ("encoder.pos_conv.0", "encoder.pos_conv"),
    ("encoder.layers.{n}.self_attn.q_proj", "encoder.layers.{n}.attn.q_proj"),
    ("encoder.layers.{n}.self_attn.k_proj", "encoder.layers.{n}.attn.k_proj"),
    ("encoder.layers.{n}.self_attn.v_proj", "encoder.layers.{n}.attn.v_proj"),
    ("encoder.layers.{n}.self_attn.out_proj", "encoder.layers.{n}.attn.out_proj"),
    ("encoder.layers.{n}.self_attn_layer_norm", "encoder.layers.{n}.attn_norm"),
    ("encoder.layers.{n}.fc1", "encoder.layers.{n}.ffn_in"),
    ("encoder.layers.{n}.fc2", "encoder.layers.{n}.ffn_out"),
    ("encoder.layers.{n}.final_layer_norm", "encoder.layers.{n}.ffn_norm"),
    ("encoder.layer_norm", "encoder.final_norm"),
)

# Official keys that the video-only encoder does not use: the audio front end, masking and
# pretraining heads. Matched as prefixes.
IGNORED_OFFICIAL_PREFIXES: tuple[str, ...] = (
    "feature_extractor_audio.", "mask_emb", "label_embs_concat", "final_proj.", "target_glu.",
)

# Fine-tuned checkpoints wrap the pretrained model (av_hubert's hubert_asr.py): the seq2seq model as
# `encoder.w2v_model.*` next to a decoder, the CTC model as `w2v_encoder.w2v_model.*` next to its
# output layer `w2v_encoder.proj`. Only the wrapped encoder is used.
FINETUNED_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("encoder.w2v_model.", "fine-tuned seq2seq (av_hubert_seq2seq)"),
    ("w2v_encoder.w2v_model.", "fine-tuned CTC (av_hubert_ctc)"),
)

# torch >= 2.1's parametrized weight norm (torch.nn.utils.parametrizations.weight_norm) stores the
# positional conv's g and v under these names; the older torch.nn.utils.weight_norm as weight_g/v.
PARAMETRIZED_WEIGHT_NORM = {"parametrizations.weight.original0": "weight_g",
                            "parametrizations.weight.original1": "weight_v"}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name in ("s", "b", "n"):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(pattern + r"\.(?P<param>[A-Za-z_0-9]+)")


_FORWARD = tuple((_template_regex(off), loc) for off, loc in OFFICIAL_TO_LOCAL)
_BACKWARD = tuple((_template_regex(loc), off) for off, loc in OFFICIAL_TO_LOCAL)


def _translate(key: str, rules) -> str | None:
    for regex, target in rules:
        m = regex.fullmatch(key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if k != "param"}
            return target.format(**groups) + "." + m["param"]
    return None


def official_to_local_key(key: str) -> str | None:
    """Official key -> key of AVHubertVideoEncoder.state_dict(); None when no rule matches."""
    return _translate(key, _FORWARD)


def local_to_official_key(key: str) -> str | None:
    """Inverse of official_to_local_key (used to export and in tests)."""
    return _translate(key, _BACKWARD)


def checkpoint_layout(state: dict[str, torch.Tensor]) -> str:
    """What a fairseq state dict holds: "pretrained" or one of FINETUNED_LAYOUTS' descriptions."""
    for prefix, what in FINETUNED_LAYOUTS:
        if any(k.startswith(prefix) for k in state):
            return what
    return "pretrained"


def unwrap_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pretrained AV-HuBERT keys: the fine-tuned wrapper stripped (its decoder or CTC output layer
    left out) and parametrized weight-norm names renamed to weight_g / weight_v."""
    for prefix, _ in FINETUNED_LAYOUTS:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    out = {}
    for key, value in state.items():
        for parametrized, plain_name in PARAMETRIZED_WEIGHT_NORM.items():
            if key.endswith("." + parametrized):
                key = key[: -len(parametrized)] + plain_name
        out[key] = value
    return out


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official (pretrained or fine-tuned) state dict -> local names. Unknown keys raise."""
    state = unwrap_official_state_dict(state)
    converted, unknown = {}, []
    for key, value in state.items():
        if key.startswith(IGNORED_OFFICIAL_PREFIXES):
            continue
        local = official_to_local_key(key)
        if local is None:
            unknown.append(key)
        else:
            converted[local] = value
    if unknown:
        raise KeyError(f"AV-HuBERT checkpoint has {len(unknown)} keys with no mapping "
                       f"(see OFFICIAL_TO_LOCAL in {__name__}): {sorted(unknown)[:20]}")
    return converted


# ----------------------------------------------------------------------------- the checkpoint's own config

# fairseq AVHubertConfig field -> AVHubertConfig field (av_hubert's hubert.py).
OFFICIAL_ARCH_FIELDS = {
    "encoder_layers": "layers", "encoder_embed_dim": "width", "encoder_ffn_embed_dim": "ffn",
    "encoder_attention_heads": "heads", "layer_norm_first": "layer_norm_first", "conv_pos": "conv_pos",
    "conv_pos_groups": "conv_pos_groups", "modality_fuse": "fuse",
}
# Where the model section sits: new-style checkpoints pickle an omegaconf `cfg`, old-style an argparse
# `args`; fine-tuned ones keep the pretrained model's section in `w2v_args` (hubert_asr.py).
_CONFIG_PLACES = (("cfg", "model", "w2v_args", "model"), ("cfg", "model", "w2v_args"), ("cfg", "model"),
                  ("args", "w2v_args", "model"), ("args", "w2v_args"), ("args",))
# The fields a flag may set when the checkpoint does not say (shapes give all the others).
ARCH_FLAGS = {"heads": "--model.avhubert-attention-heads", "layer_norm_first": "--model.avhubert-layer-norm-first"}


@dataclass
class OfficialCheckpoint:
    path: Path
    state: dict[str, torch.Tensor]
    """The `model` state dict as stored."""
    config: dict
    """The fairseq model config found in the file (plain values; empty when it carries none)."""
    config_place: str
    """Where `config` was found, e.g. "cfg.model" or "cfg.model.w2v_args.model"."""
    model_name: str | None = None
    """The file's own model name (cfg.model._name or args.arch): "av_hubert", "av_hubert_ctc", ..."""

    @property
    def layout(self) -> str:
        return checkpoint_layout(self.state)

    def describe(self) -> str:
        name = self.model_name
        return f"{self.path}: a {self.layout} fairseq checkpoint" + (f" of model {name!r}" if name else "")


def _section(tree, place: tuple[str, ...]):
    for key in place:
        if not isinstance(tree, dict) or not isinstance(tree.get(key), dict):
            return None
        tree = tree[key]
    return tree


def find_model_config(ckpt: dict) -> tuple[dict, str, str | None]:
    """The fairseq model section of a loaded checkpoint (as plain data), where it was, and the file's
    own model name."""
    tree = {"cfg": plain(ckpt.get("cfg")), "args": plain(ckpt.get("args"))}
    name = (_section(tree, ("cfg", "model")) or {}).get("_name") or (_section(tree, ("args",)) or {}).get("arch")
    name = name if isinstance(name, str) else None
    for place in _CONFIG_PLACES:
        section = _section(tree, place)
        if section is not None and ("encoder_embed_dim" in section or "encoder_layers" in section):
            return section, ".".join(place), name
    return {}, "", name


def _arch_from_shapes(state: dict[str, torch.Tensor]) -> dict:
    try:
        width = state["encoder.layer_norm.weight"].shape[0]
        channels = state["feature_extractor_video.resnet.frontend3D.0.weight"].shape[0]
        pos_v = state["encoder.pos_conv.0.weight_v"]
        ffn = state["encoder.layers.0.fc1.weight"].shape[0]
    except KeyError as e:
        raise KeyError(f"missing {e}") from None
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return dict(layers=layers, width=width, ffn=ffn, resnet_channels=channels, conv_pos=pos_v.shape[2],
                conv_pos_groups=width // pos_v.shape[1],
                fuse="concat" if "post_extract_proj.weight" in state else "add")


def resolve_avhubert_config(ckpt: OfficialCheckpoint, heads: int | None = None,
                            layer_norm_first: bool | None = None) -> AVHubertConfig:
    """The architecture of a checkpoint: sizes from the tensor shapes, checked against the file's own
    config; heads and layer_norm_first (which no shape shows) from that config. A flag (not None)
    fills in what the file does not say and must agree with what it does say."""
    state = unwrap_official_state_dict(ckpt.state)
    try:
        arch = _arch_from_shapes(state)
    except KeyError as err:
        raise KeyError(f"{ckpt.describe()}, not an AV-HuBERT video encoder ({err.args[0]}; it has "
                       f"{len(state)} tensors, e.g. {sorted(state)[:5]})") from None
    own = {OFFICIAL_ARCH_FIELDS[k]: v for k, v in ckpt.config.items()
           if k in OFFICIAL_ARCH_FIELDS and _usable(OFFICIAL_ARCH_FIELDS[k], v)}
    where = f"{ckpt.config_place} of {ckpt.path}"
    clashes = [f"{k}: {own[k]!r} in the config, {arch[k]!r} in the tensors" for k in arch
               if k in own and own[k] != arch[k]]
    if clashes:
        raise ValueError(f"{ckpt.describe()} contradicts itself ({where}): {'; '.join(clashes)}")
    flags = {"heads": heads, "layer_norm_first": layer_norm_first}
    refused = [f"{ARCH_FLAGS[k]} {v} disagrees with the checkpoint's own config ({k}={own[k]!r} in {where}); "
               f"leave the flag out" for k, v in flags.items() if v is not None and k in own and own[k] != v]
    if refused:
        raise ValueError("; ".join(refused))
    arch["heads"] = own.get("heads", heads if heads is not None else max(1, arch["width"] // 64))
    arch["layer_norm_first"] = own.get("layer_norm_first", True if layer_norm_first is None else layer_norm_first)
    if arch["width"] % arch["heads"]:
        raise ValueError(f"{ckpt.path}: width {arch['width']} is not divisible by {arch['heads']} heads")
    return AVHubertConfig(**arch)


def _usable(field: str, value) -> bool:
    """A config value of the field's type (an omegaconf interpolation string or a None is not)."""
    kinds = {"layer_norm_first": bool, "fuse": str}
    kind = kinds.get(field, int)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def config_from_official_state_dict(state: dict[str, torch.Tensor], layer_norm_first: bool = True,
                                    heads: int | None = None) -> AVHubertConfig:
    """The architecture from a bare state dict (no config: heads = D / 64, as in both releases)."""
    return resolve_avhubert_config(OfficialCheckpoint(Path("<state dict>"), state, {}, ""), heads, layer_norm_first)


# ----------------------------------------------------------------------------- reading the pickle

class _Inert:
    """Stands in for every non-tensor object of a fairseq pickle (its argparse/omegaconf config, enums,
    numpy scalars, and anything else): built and filled without running any code of the file's. It
    keeps what the pickle hands it (constructor arguments, state) as data, for `plain`."""
    global_name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _stand_in(name: str) -> type:
    return type(f"Inert[{name}]", (_Inert,), {"global_name": name})


def plain(obj, depth: int = 0):
    """Stand-ins -> plain Python values: omegaconf DictConfig/ListConfig -> dict/list, their nodes ->
    the value, argparse Namespace -> dict, enum member -> its value, numpy scalar -> number. Anything
    else (a class reference, an unknown object) -> None."""
    if depth > 64:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, dict):
        return {k: plain(v, depth + 1) for k, v in obj.items() if isinstance(k, str)}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    if not isinstance(obj, _Inert):
        return None
    name, state, args = obj.global_name, obj.state, obj.args
    if name.startswith("omegaconf.") and isinstance(state, dict):
        return plain(state.get("_content" if "_content" in state else "_val"), depth + 1)
    if name.endswith("multiarray.scalar") and len(args) == 2 and isinstance(args[1], bytes):
        return _numpy_scalar(args[0], args[1])
    if isinstance(state, dict) and not args:
        return plain(state, depth + 1)                   # argparse.Namespace, plain objects
    if len(args) == 1 and state is None:
        return plain(args[0], depth + 1)                 # enum member: EnumClass(value)
    return None


def _numpy_scalar(dtype, raw: bytes):
    import numpy as np

    code = dtype.args[0] if isinstance(dtype, _Inert) and dtype.args and isinstance(dtype.args[0], str) else None
    order = dtype.state[1] if isinstance(dtype, _Inert) and isinstance(dtype.state, tuple) and len(dtype.state) > 1 else "|"
    try:
        dt = np.dtype(code)
        dt = dt.newbyteorder(order) if order in "<>" else dt
        return np.frombuffer(raw, dtype=dt)[0].item()
    except (TypeError, ValueError, IndexError):
        return None


def read_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """A fairseq checkpoint's `model` state dict and model config, loaded with weights_only=True.

    fairseq also pickles its config objects; each of their names is mapped to an inert stand-in, so
    nothing in the file can run code (a planted `os.system` is refused by torch outright), and the
    config is read back from what the stand-ins hold. mmap keeps the tensors on disk until copied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AV-HuBERT checkpoint not found: {path}")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:   # noqa: BLE001 - not a torch zip archive
        raise ValueError(f"{path} is not a torch checkpoint in the zip format ({err})") from err
    try:
        with torch.serialization.safe_globals([(_stand_in(name), name) for name in names]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:      # torch blocks os, subprocess, builtins.eval... outright
        raise ValueError(f"{path}: refused, it would run code when loaded "
                         f"({' '.join(str(err).split())[-200:]})") from None
    state = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KeyError(f"{path} is not a fairseq checkpoint (no 'model' state dict of tensors)")
    return OfficialCheckpoint(path, state, *find_model_config(ckpt))


def export_official_state_dict(encoder: AVHubertVideoEncoder) -> dict[str, torch.Tensor]:
    """Local weights under the official key names (the inverse mapping)."""
    out = {}
    for key, value in encoder.state_dict().items():
        official = local_to_official_key(key)
        if official is None:
            raise KeyError(f"no official name for local key {key}")
        out[official] = value
    return out
