"""Read a CTranslate2 Whisper model (`model.bin`) into a transformers Whisper state dict.

CTranslate2's `model.bin` (binary format version 6, written by `ctranslate2.specs.ModelSpec.save`):

    uint32 version                                  little-endian throughout
    string spec name                                uint16 byte count, then the bytes, NUL-terminated
    uint32 spec revision
    uint32 variable count, then per variable:
        string name                                 e.g. "encoder/layer_0/self_attention/linear_0/weight"
        uint8 rank, rank x uint32 dims
        uint8 dtype                                 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16
        uint32 byte count, the raw little-endian data
    uint32 alias count, then per alias: string alias, string target   (shared weights)

Scalars (rank 0) are options of the spec (number of heads, activation, pre_norm ...). The Whisper
spec fuses attention projections: self-attention `linear_0` is q|k|v stacked on the output axis,
cross-attention `linear_0` is q and `linear_1` is k|v; `linear_last` is the output projection. Key
projections have no bias in Whisper: CTranslate2 stores zeros there, which the mapping checks.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_VERSIONS = (5, 6)
WHISPER_SPEC = "WhisperSpec"
CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
# Spec options that carry no tensor of the transformers model (checked, or harmless here).
WHISPER_OPTIONS = {"decoder/activation", "decoder/alibi", "decoder/alignment_heads", "decoder/alignment_layer",
                   "decoder/num_heads", "decoder/pre_norm", "decoder/scale_embeddings",
                   "decoder/start_from_zero_embedding", "encoder/num_heads"}


@dataclass
class Ct2Model:
    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        return self.variables[self.aliases.get(name, name)]

    def scalar(self, name: str) -> int:
        return int(self.get(name).item())


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated CTranslate2 file (wanted {n} bytes at offset {self.pos}, "
                             f"file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = self.take(n)
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: not a CTranslate2 model (unreadable name at offset {self.pos - n})") from None


def read_ctranslate2(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 `model.bin` of any spec; tensors are copied out of the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CTranslate2 model file not found: {path}")
    r = _Reader(path.read_bytes(), path)
    (version,) = r.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: not a CTranslate2 model of a known format (version field {version}, "
                         f"expected one of {SUPPORTED_VERSIONS})")
    spec = r.string()
    (revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = r.string()
        (rank,) = r.unpack("B")
        dims = r.unpack(f"{rank}I") if rank else ()
        (code,) = r.unpack("B")
        if code not in CT2_DTYPES:
            raise ValueError(f"{path}: variable {name} has unknown dtype code {code}")
        (nbytes,) = r.unpack("I")
        dtype = CT2_DTYPES[code]
        numel = 1
        for d in dims:
            numel *= d
        if numel * dtype.itemsize != nbytes:
            raise ValueError(f"{path}: variable {name} has {nbytes} bytes for shape {dims} of {dtype}")
        raw = bytearray(r.take(nbytes))
        variables[name] = torch.frombuffer(raw, dtype=dtype).reshape(dims) if numel else torch.empty(dims, dtype=dtype)
    aliases: dict[str, str] = {}
    if r.pos < len(r.data):
        (n_alias,) = r.unpack("I")
        for _ in range(n_alias):
            alias = r.string()
            aliases[alias] = r.string()
    if r.pos != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.pos} unexpected bytes after the variables")
    return Ct2Model(path, version, spec, revision, variables, aliases)


def _fused(weight: torch.Tensor, bias: torch.Tensor | None, parts: int, what: str):
    if weight.shape[0] % parts:
        raise ValueError(f"{what}: fused weight of {weight.shape[0]} rows does not split in {parts}")
    w = weight.chunk(parts, dim=0)
    b = bias.chunk(parts, dim=0) if bias is not None else (None,) * parts
    return list(zip(w, b))


def whisper_state_dict(model: Ct2Model, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (state dict of transformers' WhisperForConditionalGeneration, config dims).

    Every CTranslate2 variable is used exactly once (or is a known spec option); anything else,
    and any other spec, is an error naming the file."""
    if model.spec != WHISPER_SPEC:
        raise ValueError(f"{model.path}: CTranslate2 spec is {model.spec!r}, not a Whisper model ({WHISPER_SPEC})")
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        try:
            t = model.get(name)
        except KeyError:
            raise ValueError(f"{model.path}: Whisper variable {name!r} missing") from None
        used.add(model.aliases.get(name, name))
        return t.to(dtype)

    def has(name: str) -> bool:
        return model.aliases.get(name, name) in model.variables

    def layer_norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = get(f"{src}/gamma"), get(f"{src}/beta")

    def linear(src: str, dst: str, bias: bool = True) -> None:
        out[f"{dst}.weight"] = get(f"{src}/weight")
        if bias:
            out[f"{dst}.bias"] = get(f"{src}/bias")

    def split(src: str, dsts: list[str]) -> None:
        for (w, b), dst in zip(_fused(get(f"{src}/weight"), get(f"{src}/bias"), len(dsts), f"{model.path}: {src}"), dsts):
            out[f"{dst}.weight"] = w.clone()
            if dst.endswith("k_proj"):       # Whisper's key projections have no bias
                if b.abs().max() > 0:
                    raise ValueError(f"{model.path}: {src} has a non-zero key bias; not a Whisper layout")
            else:
                out[f"{dst}.bias"] = b.clone()

    def block(src: str, dst: str, cross: bool) -> None:
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        split(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
        if cross:
            layer_norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
            split(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"])
            linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")

    def count_layers(prefix: str) -> int:
        n = 0
        while has(f"{prefix}/layer_{n}/ffn/linear_0/weight"):
            n += 1
        if n == 0:
            raise ValueError(f"{model.path}: no {prefix} layers found")
        return n

    for flag in ("decoder/scale_embeddings", "decoder/alibi"):
        if has(flag) and model.scalar(flag):
            raise ValueError(f"{model.path}: {flag} is set, which Whisper never uses")
    used.update(o for o in WHISPER_OPTIONS if o in model.variables)
    out: dict[str, torch.Tensor] = {}
    n_enc, n_dec = count_layers("encoder"), count_layers("decoder")
    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["model.encoder.embed_positions.weight"] = get("encoder/position_encodings/encodings")
    for i in range(n_enc):
        block(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    layer_norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    for i in range(n_dec):
        block(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    layer_norm("decoder/layer_norm", "model.decoder.layer_norm")
    projection = "decoder/projection/weight"
    tied = model.aliases.get(projection) == "decoder/embeddings/weight"
    if not tied:
        out["proj_out.weight"] = get(projection)
    unused = sorted(set(model.variables) - used)
    if unused:
        raise ValueError(f"{model.path}: variables not part of a Whisper model: {unused[:10]}")

    conv1 = out["model.encoder.conv1.weight"]
    dims = dict(
        vocab_size=out["model.decoder.embed_tokens.weight"].shape[0],
        num_mel_bins=conv1.shape[1], d_model=conv1.shape[0],
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=model.scalar("encoder/num_heads"),
        decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=out["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=out["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=out["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=out["model.decoder.embed_positions.weight"].shape[0],
        tie_word_embeddings=tied,
    )
    return out, dims
