"""PNG figures in the style of the paper: attention maps, massive activations, cosine to BOS.

Uses matplotlib's object API (Figure + Agg canvas), not pyplot: no global backend switch, no
figure registry to leak, safe to call from a training process.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from trainer.model.roles import ROLE_NAMES
from trainer.monitor.analysis import LayerMaps, SinkReport

_TOP_FEATURES = 8  # features drawn in the activation figure


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _segments(roles: torch.Tensor) -> list[tuple[int, int, str]]:
    """(start, end, role name) runs of equal roles."""
    out, start = [], 0
    values = roles.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i, ROLE_NAMES.get(values[start], "?")))
            start = i
    return out


def attention_figure(report: SinkReport, layer: int, maps: LayerMaps, path: Path, head: int | None) -> Path:
    probs = maps.attn_probs
    attn = probs.mean(0) if head is None else probs[head]
    t0 = attn.shape[0]
    segs = _segments(report.token_roles[0, :t0])
    alpha = report.layer(layer).sink_scores[0, :, :t0]
    alpha = alpha.mean(0) if head is None else alpha[head]

    fig = Figure(figsize=(7, 8.5))
    ax, bx = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4, 1]}, sharex=True)
    im = ax.imshow(attn.numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=max(float(attn.max()), 1e-6)))
    for s, _, _ in segs[1:]:
        ax.axvline(s - 0.5, color="w", lw=0.6)
        ax.axhline(s - 0.5, color="w", lw=0.6)
    mids = [(s + e - 1) / 2 for s, e, _ in segs]
    ax.set_yticks(mids, [n for *_, n in segs], fontsize=7)
    ax.set_ylabel("query")
    ax.set_title(f"layer {layer}, {'mean over heads' if head is None else f'head {head}'} (sample 0)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    bx.bar(range(t0), alpha.numpy(), color="tab:red", width=1.0)
    bx.axhline(report.sink_epsilon, color="k", ls="--", lw=0.8)
    bx.set_ylabel("sink score")
    bx.set_xticks(mids, [n for *_, n in segs], rotation=45, fontsize=7, ha="right")
    bx.set_xlabel("key")
    fig.tight_layout()
    return _save(fig, path)


def activation_figure(report: SinkReport, layer: int, maps: LayerMaps, path: Path) -> Path:
    abs_h = maps.abs_hidden  # [T0, D]
    t0, d = abs_h.shape
    feats = abs_h.max(0).values.topk(min(_TOP_FEATURES, d)).indices.sort().values.tolist()
    stats = report.layer(layer)
    massive = set(stats.massive_features)

    fig = Figure(figsize=(8, 6))
    ax = fig.add_subplot(projection="3d")
    xs = list(range(t0))
    for yi, j in enumerate(feats):
        color = "tab:red" if j in massive else "tab:blue"
        ax.bar(xs, abs_h[:, j].numpy(), zs=yi, zdir="y", color=color, alpha=0.8, width=1.0)
    ax.set_yticks(range(len(feats)), [str(j) for j in feats], fontsize=7)
    ax.set_xlabel("token")
    ax.set_ylabel("feature")
    ax.set_zlabel("|H|")
    ax.set_title(
        f"layer {layer}: max |H| {stats.max_abs:.3g}, {stats.massive_ratio:.3g}x median, "
        f"massive features {sorted(massive) or 'none'}",
        fontsize=9,
    )
    return _save(fig, path)


def cosine_figure(report: SinkReport, path: Path) -> Path:
    """Mean cos to BOS per layer for tokens that are intermediate sinks in any layer vs the others."""
    b, t = report.token_roles.shape
    ever_sink = torch.zeros(b, t, dtype=torch.bool)
    for s in report.layers:
        for tok in s.sink_tokens:
            if tok.token > 0:
                ever_sink[tok.batch, tok.token] = True
    real = torch.arange(t)[None, :] < report.lengths[:, None]
    real[:, 0] = False
    layers = [s.layer for s in report.layers]
    sink_cos, other_cos = [], []
    for s in report.layers:
        c = s.cos_to_bos[:, :t]
        sink_cos.append(float(c[ever_sink & real].mean()) if bool((ever_sink & real).any()) else float("nan"))
        other_cos.append(float(c[~ever_sink & real].mean()) if bool((~ever_sink & real).any()) else float("nan"))

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(layers, sink_cos, "o-", color="tab:red", label="intermediate sinks")
    ax.plot(layers, other_cos, "s-", color="tab:blue", label="other tokens")
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(H[BOS], H[token])")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def bos_heads_figure(report: SinkReport, path: Path) -> Path:
    """Sink score of BOS per (layer, head), mean over samples."""
    grid = torch.stack([s.sink_scores[:, :, 0].mean(0) for s in report.layers])  # [L, H]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(len(report.layers)), [str(s.layer) for s in report.layers], fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("BOS sink score")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def write_figures(
    report: SinkReport,
    maps: Mapping[int, LayerMaps] | None,
    out_dir: str | Path,
    head: int | None = None,
) -> list[Path]:
    """Write all figures into out_dir; `maps` defaults to the maps kept in the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = report.maps if maps is None else maps
    paths = []
    for layer, m in sorted(maps.items()):
        paths.append(attention_figure(report, layer, m, out / f"attention_L{layer:02d}.png", head))
        paths.append(activation_figure(report, layer, m, out / f"activations_L{layer:02d}.png"))
    if report.layers:
        paths.append(cosine_figure(report, out / "cos_to_bos.png"))
        paths.append(bos_heads_figure(report, out / "bos_sink_heads.png"))
    return paths
