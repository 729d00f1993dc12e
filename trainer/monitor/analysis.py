"""Sink scores, massive activations, their MLP origin and cosine to BOS (DESIGN.md section 2).

`SinkAnalyzer` is the `on_layer` callback of `capture.capture_layers`: it reduces each layer's
maps as soon as the block has run, so only small per-layer results (and the full maps of the
few figure layers) outlive the forward.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.model.roles import ROLE_NAMES, TokenRole
from trainer.monitor.capture import LayerCapture
from trainer.monitor.config import MonitorConfig


@dataclass
class SinkToken:
    """A token that is a sink (alpha > epsilon) in at least one head of a layer."""

    batch: int
    token: int
    role: str
    head_frac: float
    """Fraction of the layer's heads in which the token is a sink."""
    massive_features: list[int]
    """Features j with a massive H^l[token, j] (block output of the same layer)."""


@dataclass
class MassiveEntry:
    """One entry of H^l (top-k by magnitude, or a massive activation)."""

    batch: int
    token: int
    feature: int
    value: float
    """Signed value of H^l[batch, token, feature]."""
    ratio: float
    """|value| / median(|H^l|) over the real tokens of the batch."""


@dataclass
class MassiveToken:
    """A token that carries at least one massive activation in a layer's block output."""

    batch: int
    token: int
    role: str
    features: list[int]
    """Features j with a massive H^l[batch, token, j], largest |value| first."""
    max_abs: float
    """Largest |H^l[batch, token, j]| over those features."""
    is_sink: bool
    """The token is also a sink (in at least one head) in this layer."""


@dataclass
class LayerStats:
    layer: int
    num_heads: int
    sink_scores: torch.Tensor
    """[B, H, T] alpha^{l,h}_k over real queries of each sample; 0 on padding keys."""
    sink_head_frac: torch.Tensor
    """[B, T] fraction of heads in which each token is a sink."""
    bos_sink_head_frac: float
    """Mean over samples of the fraction of heads where BOS (position 0) is a sink."""
    sink_tokens: list[SinkToken]
    intermediate_sink_count: float
    """Mean number of non-BOS sink tokens per sample."""
    intermediate_sink_head_frac: float
    """Mean head fraction over the intermediate sink tokens (0 when there are none)."""
    sinks_by_role: dict[str, int]
    median_abs: float
    max_abs: float
    massive_ratio: float
    """max |H^l| / median |H^l| (real tokens)."""
    massive_count: int
    massive_entries: list[MassiveEntry]
    """All massive entries (the largest `max_massive_entries` of them when there are more)."""
    massive_tokens: list[MassiveToken]
    """The tokens that carry the massive entries, largest first: who holds the massive values."""
    top_k: list[MassiveEntry]
    massive_features: list[int]
    sink_features_shared: bool | None
    """All sink tokens carry massive activations in the same feature set (None: no sink tokens)."""
    mlp_abs_at_massive: float
    """Mean |down_proj output| at the massive entries (NaN without massive entries)."""
    attn_abs_at_massive: float
    """Mean |o_proj output| at the massive entries."""
    mlp_share: float
    """sum|mlp| / (sum|mlp| + sum|attn|) at the massive entries; ~1 = created by the MLP."""
    cos_to_bos: torch.Tensor
    """[B, T] cos(H^l[b, 0], H^l[b, i]); NaN on padding."""
    cos_to_bos_sink: float
    """Mean cosine to BOS of this layer's intermediate sink tokens (NaN if none)."""
    cos_to_bos_nonsink: float
    """Mean cosine to BOS of the other real non-BOS tokens."""


@dataclass
class LayerMaps:
    """Full maps of sample 0 (real tokens only) kept for the figures."""

    attn_probs: torch.Tensor
    """[H, T0, T0]"""
    abs_hidden: torch.Tensor
    """[T0, D] |H^l|"""


def _nanmean(x: torch.Tensor) -> float:
    return float(x.mean()) if x.numel() else math.nan


def lengths_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real lengths of a right-padded mask; rejects left padding / holes (BOS must sit at 0)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    if not torch.equal(mask, expected) or bool((lengths == 0).any()):
        raise ValueError("attention_mask must be right-padded with at least one real token per row")
    return lengths


def default_roles(attention_mask: torch.Tensor) -> torch.Tensor:
    """Roles for a text-only batch: BOS at 0, text elsewhere, PAD on padding."""
    roles = torch.full_like(attention_mask, int(TokenRole.TRANSCRIPT), dtype=torch.long)
    roles[attention_mask == 0] = int(TokenRole.PAD)
    roles[:, 0] = int(TokenRole.BOS)
    return roles


def sink_scores(attn_probs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """alpha[b, h, k] = 1/(T_b - k) * sum_{k <= i < T_b} A[b, h, i, k]; 0 for padding keys."""
    _, _, t, _ = attn_probs.shape
    ar = torch.arange(t, device=attn_probs.device)
    real = ar[None, :] < lengths[:, None]  # [B, T]
    causal = ar[:, None] >= ar[None, :]  # [i, k]
    weight = (real[:, :, None] & causal[None]).to(torch.float32)  # [B, i, k]: real queries that see k
    colsum = torch.einsum("bhik,bik->bhk", attn_probs.float(), weight)
    denom = (lengths[:, None] - ar[None, :]).clamp(min=1).to(torch.float32)
    return colsum / denom[:, None, :] * real[:, None, :]


class SinkAnalyzer:
    """Reduces each captured layer to `LayerStats`; keeps full maps for `figure_layers` only."""

    def __init__(
        self,
        cfg: MonitorConfig,
        attention_mask: torch.Tensor,
        token_roles: torch.Tensor | None = None,
        figure_layers: set[int] | frozenset[int] = frozenset(),
    ):
        self.cfg = cfg
        self.lengths = lengths_from_mask(attention_mask).cpu()
        self.roles = (token_roles if token_roles is not None else default_roles(attention_mask)).cpu()
        self.figure_layers = set(figure_layers)
        self.layers: list[LayerStats] = []
        self.maps: dict[int, LayerMaps] = {}

    def __call__(self, cap: LayerCapture) -> None:
        self.layers.append(self._analyse(cap))
        if cap.layer in self.figure_layers:
            t0 = int(self.lengths[0])
            self.maps[cap.layer] = LayerMaps(
                attn_probs=cap.attn_probs[0, :, :t0, :t0].float().cpu(),
                abs_hidden=cap.resid[0, :t0].float().abs().cpu(),
            )

    def _analyse(self, cap: LayerCapture) -> LayerStats:
        cfg = self.cfg
        device = cap.resid.device
        lengths = self.lengths.to(device)
        b, t = cap.resid.shape[:2]
        real = torch.arange(t, device=device)[None, :] < lengths[:, None]  # [B, T]

        # --- sinks
        alpha = sink_scores(cap.attn_probs, lengths)
        num_heads = alpha.shape[1]
        # keys seen by too few queries are not classified (config.sink_min_queries, at most a quarter
        # of the sample's length, so short texts keep their sinks); BOS always is
        seen_by = lengths[:, None] - torch.arange(t, device=device)[None, :]  # [B, T] real queries per key
        needed = (lengths // 4).clamp(min=1, max=cfg.sink_min_queries)
        scored = seen_by >= needed[:, None]
        scored[:, 0] = True
        head_frac = ((alpha > cfg.sink_epsilon) & scored[:, None, :]).float().mean(1)  # [B, T]; pads: 0
        is_sink = head_frac > 0
        inter = is_sink.clone()
        inter[:, 0] = False

        # --- massive activations of the block output, over real tokens only
        h = cap.resid.float()
        abs_h = h.abs()
        median = float(abs_h[real].median())
        max_abs = float(abs_h[real].max())
        massive = (abs_h > cfg.massive_abs) & (abs_h > cfg.massive_ratio * median) & real[:, :, None]
        idx = massive.nonzero()  # [N, 3] (b, t, j)
        if idx.shape[0] > cfg.max_massive_entries:
            keep = abs_h[idx[:, 0], idx[:, 1], idx[:, 2]].topk(cfg.max_massive_entries).indices
            idx = idx[keep.sort().values]
        safe_median = median if median > 0 else math.inf

        def entry(bi: int, ti: int, ji: int) -> MassiveEntry:
            v = float(h[bi, ti, ji])
            return MassiveEntry(bi, ti, ji, v, abs(v) / safe_median)

        massive_entries = [entry(*map(int, row)) for row in idx.tolist()]
        flat = abs_h.masked_fill(~real[:, :, None], -1.0).flatten()
        k = min(cfg.top_k, int(real.sum()) * h.shape[-1])
        top = flat.topk(k).indices
        d = h.shape[-1]
        top_k = [entry(int(i) // (t * d), (int(i) // d) % t, int(i) % d) for i in top.tolist()]

        # --- MLP vs attention contribution at the massive entries
        if idx.shape[0]:
            mlp_abs = cap.mlp_out.float()[idx[:, 0], idx[:, 1], idx[:, 2]].abs()
            attn_abs = cap.attn_out.float()[idx[:, 0], idx[:, 1], idx[:, 2]].abs()
            total = float(mlp_abs.sum() + attn_abs.sum())
            mlp_share = float(mlp_abs.sum()) / total if total > 0 else math.nan
            mlp_mean, attn_mean = float(mlp_abs.mean()), float(attn_abs.mean())
        else:
            mlp_share = mlp_mean = attn_mean = math.nan

        # --- sink tokens with their roles and massive features
        feats_by_token: dict[tuple[int, int], set[int]] = {}
        for bi, ti, ji in idx.tolist():
            feats_by_token.setdefault((bi, ti), set()).add(ji)
        sink_tokens = []
        for bi, ti in is_sink.nonzero().tolist():
            role = ROLE_NAMES.get(int(self.roles[bi, ti]), "unknown")
            feats = sorted(feats_by_token.get((bi, ti), set()))
            sink_tokens.append(SinkToken(bi, ti, role, float(head_frac[bi, ti]), feats))
        sink_set = {(s.batch, s.token) for s in sink_tokens}
        massive_tokens = []
        for bi, ti in massive.any(-1).nonzero().tolist():
            feats = massive[bi, ti].nonzero().flatten()
            vals = abs_h[bi, ti, feats]
            order = vals.argsort(descending=True)
            massive_tokens.append(MassiveToken(
                bi, ti, ROLE_NAMES.get(int(self.roles[bi, ti]), "unknown"), feats[order].tolist(),
                float(vals.max()), (bi, ti) in sink_set))
        massive_tokens.sort(key=lambda m: -m.max_abs)
        feature_sets = {tuple(s.massive_features) for s in sink_tokens}
        shared = None if not sink_tokens else (len(feature_sets) == 1 and () not in feature_sets)

        # --- cosine to BOS
        hn = F.normalize(h, dim=-1)
        cos = (hn * hn[:, :1]).sum(-1).masked_fill(~real, math.nan)  # [B, T]
        later = real.clone()
        later[:, 0] = False
        nonsink = later & ~inter

        return LayerStats(
            layer=cap.layer,
            num_heads=num_heads,
            sink_scores=alpha.cpu(),
            sink_head_frac=head_frac.cpu(),
            bos_sink_head_frac=float(head_frac[:, 0].mean()),
            sink_tokens=sink_tokens,
            intermediate_sink_count=float(inter.sum()) / b,
            intermediate_sink_head_frac=float(head_frac[inter].mean()) if bool(inter.any()) else 0.0,
            sinks_by_role=dict(Counter(s.role for s in sink_tokens)),
            median_abs=median,
            max_abs=max_abs,
            massive_ratio=max_abs / safe_median,
            massive_count=int(massive.sum()),
            massive_entries=massive_entries,
            massive_tokens=massive_tokens,
            top_k=top_k,
            massive_features=sorted({e.feature for e in massive_entries}),
            sink_features_shared=shared,
            mlp_abs_at_massive=mlp_mean,
            attn_abs_at_massive=attn_mean,
            mlp_share=mlp_share,
            cos_to_bos=cos.cpu(),
            cos_to_bos_sink=_nanmean(cos[inter]),
            cos_to_bos_nonsink=_nanmean(cos[nonsink]),
        )

    def report(self, step: int = 0, token_labels: list[list[str]] | None = None) -> SinkReport:
        return SinkReport(
            step=step,
            lengths=self.lengths,
            token_roles=self.roles,
            layers=sorted(self.layers, key=lambda s: s.layer),
            maps=self.maps,
            sink_epsilon=self.cfg.sink_epsilon,
            token_labels=token_labels,
        )


@dataclass
class SinkReport:
    step: int
    lengths: torch.Tensor
    """[B] real lengths of the probe rows."""
    token_roles: torch.Tensor
    """[B, T] TokenRole values."""
    layers: list[LayerStats]
    maps: dict[int, LayerMaps] = field(default_factory=dict)
    """Full maps of sample 0 for the figure layers."""
    sink_epsilon: float = 0.3
    """The epsilon the sinks were found with (drawn in the figures)."""
    files: list[Path] = field(default_factory=list)
    """Files written for this report (JSON and PNGs), for logging as artefacts."""
    token_labels: list[list[str]] | None = None
    """Per sample, a label per real token ('<s>', '<video>', 'audio#3', a word piece); None = unknown."""

    def label(self, batch: int, token: int) -> str:
        """The token's label, or its role and position when no labels were given."""
        if self.token_labels is not None and batch < len(self.token_labels) and token < len(self.token_labels[batch]):
            return self.token_labels[batch][token]
        return f"{ROLE_NAMES.get(int(self.token_roles[batch, token]), '?')}@{token}"

    def layer(self, index: int) -> LayerStats:
        for s in self.layers:
            if s.layer == index:
                return s
        raise KeyError(f"layer {index} was not analysed")

    @property
    def first_massive_layer(self) -> int:
        """First analysed layer with a massive activation (-1: none)."""
        return next((s.layer for s in self.layers if s.massive_count > 0), -1)

    def to_metrics(self, prefix: str = "sinks/") -> dict[str, float]:
        """Flat float metrics (NaN values are left out: MLflow charts them badly)."""
        out: dict[str, float] = {}
        for s in self.layers:
            p = f"{prefix}L{s.layer:02d}/"
            values = {
                "bos_sink_head_frac": s.bos_sink_head_frac,
                "intermediate_sink_count": s.intermediate_sink_count,
                "intermediate_sink_head_frac": s.intermediate_sink_head_frac,
                "max_massive": s.max_abs,
                "massive_ratio": s.massive_ratio,
                "massive_count": float(s.massive_count),
                "cos_to_bos_sink": s.cos_to_bos_sink,
                "cos_to_bos_nonsink": s.cos_to_bos_nonsink,
                "mlp_share": s.mlp_share,
            }
            out.update({p + k: float(v) for k, v in values.items() if not math.isnan(v)})
        if self.layers:
            out[prefix + "bos_sink_head_frac_mean"] = sum(s.bos_sink_head_frac for s in self.layers) / len(self.layers)
            out[prefix + "intermediate_sink_count_mean"] = sum(
                s.intermediate_sink_count for s in self.layers
            ) / len(self.layers)
            out[prefix + "massive_layers"] = float(sum(s.massive_count > 0 for s in self.layers))
            out[prefix + "max_massive"] = max(s.max_abs for s in self.layers)
        first = self.first_massive_layer
        out[prefix + "first_massive_layer"] = float(first)
        if first >= 0 and not math.isnan(self.layer(first).mlp_share):
            out[prefix + "origin_mlp_share"] = self.layer(first).mlp_share
        roles = Counter()
        for s in self.layers:
            roles.update(s.sinks_by_role)
        for name in ROLE_NAMES.values():
            out[f"{prefix}role/{name}"] = float(roles.get(name, 0))
        return out

    def to_json(self) -> dict:
        """Per-layer detail (JSON-serialisable; NaN written as None)."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        def cos_rows(c: torch.Tensor) -> list[list[float]]:
            return [[round(v, 5) for v in row[: int(n)].tolist()] for row, n in zip(c, self.lengths)]

        layers = []
        for s in self.layers:
            layers.append(
                {
                    "layer": s.layer,
                    "num_heads": s.num_heads,
                    "bos_sink_head_frac": s.bos_sink_head_frac,
                    "intermediate_sink_count": s.intermediate_sink_count,
                    "intermediate_sink_head_frac": s.intermediate_sink_head_frac,
                    "sink_tokens": [{**asdict(t), "label": self.label(t.batch, t.token)} for t in s.sink_tokens],
                    "sinks_by_role": s.sinks_by_role,
                    "median_abs": s.median_abs,
                    "max_abs": s.max_abs,
                    "massive_ratio": num(s.massive_ratio),
                    "massive_count": s.massive_count,
                    "massive_features": s.massive_features,
                    "sink_features_shared": s.sink_features_shared,
                    "massive_entries": [asdict(e) for e in s.massive_entries],
                    "massive_entries_truncated": len(s.massive_entries) < s.massive_count,
                    "massive_tokens": [{**asdict(m), "label": self.label(m.batch, m.token)} for m in s.massive_tokens],
                    "top_k": [asdict(e) for e in s.top_k],
                    "mlp_abs_at_massive": num(s.mlp_abs_at_massive),
                    "attn_abs_at_massive": num(s.attn_abs_at_massive),
                    "mlp_share": num(s.mlp_share),
                    "cos_to_bos_sink": num(s.cos_to_bos_sink),
                    "cos_to_bos_nonsink": num(s.cos_to_bos_nonsink),
                    "cos_to_bos": cos_rows(s.cos_to_bos),
                }
            )
        return {
            "step": self.step,
            "lengths": self.lengths.tolist(),
            "token_roles": [row[: int(n)].tolist() for row, n in zip(self.token_roles, self.lengths)],
            "token_labels": self.token_labels,
            "sink_epsilon": self.sink_epsilon,
            "first_massive_layer": self.first_massive_layer,
            "layers": layers,
        }
