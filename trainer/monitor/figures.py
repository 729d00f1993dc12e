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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from trainer.model.roles import ROLE_NAMES, TokenRole
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


_MAX_TICKS = 64        # token ticks per axis before they are thinned
_FEATURE_ROLES = {int(TokenRole.AUDIO), int(TokenRole.VIDEO)}
_TEXT_ROLES = {int(TokenRole.INSTRUCTION), int(TokenRole.TRANSCRIPT)}


def _short(label: str, width: int = 14) -> str:
    label = label.replace("\u0120", " ").replace("\u2581", " ").replace("\n", "\\n")
    if not label.strip():
        label = "\u2423"            # a visible space
    return label if len(label) <= width else label[: width - 1] + "\u2026"


def _token_ticks(report: SinkReport, t0: int) -> tuple[list[float], list[str]]:
    """Axis ticks for sample 0: one per run of audio/video feature slots ('audio x12'), one per other
    token (its label). BOS, delimiters and feature runs are always named; when there are too many
    ticks, the text tokens (instruction, transcript) are thinned evenly."""
    fixed: list[tuple[float, str]] = []
    text: list[tuple[float, str]] = []
    for s, e, name in _segments(report.token_roles[0, :t0]):
        role = int(report.token_roles[0, s])
        if role in _FEATURE_ROLES:
            fixed.append(((s + e - 1) / 2, f"{name} \u00d7{e - s}"))
        else:
            (text if role in _TEXT_ROLES else fixed).extend((float(i), _short(report.label(0, i))) for i in range(s, e))
    room = max(_MAX_TICKS - len(fixed), 8)
    if len(text) > room:
        text = text[:: -(-len(text) // room)]
    ticks = sorted(fixed + text)
    return [t for t, _ in ticks], [n for _, n in ticks]


def _fontsize(n: int) -> float:
    return 7 if n <= 24 else (6 if n <= 40 else 5)


def attention_figure(report: SinkReport, layer: int, maps: LayerMaps, path: Path, head: int | None) -> Path:
    return _save(draw_attention(report, layer, maps, head), path)


def draw_attention(report: SinkReport, layer: int, maps: LayerMaps, head: int | None) -> Figure:
    """Attention map of sample 0 (rows: queries, columns: keys) above its keys' sink scores."""
    probs = maps.attn_probs
    attn = probs.mean(0) if head is None else probs[head]
    t0 = attn.shape[0]
    segs = _segments(report.token_roles[0, :t0])
    stats = report.layer(layer)
    alpha_all = stats.sink_scores[0, :, :t0]
    head_frac = stats.sink_head_frac[0, :t0]
    eps = report.sink_epsilon
    # bars of the same kind as the threshold: a head's score (the largest over heads) vs epsilon
    alpha = alpha_all.max(0).values if head is None else alpha_all[head]
    sink = (head_frac > 0) & (alpha > eps)   # classified as a sink (head_frac > 0: the key was scored)
    unscored = (alpha > eps) & ~sink          # over epsilon, but seen by too few queries to count
    ticks, names = _token_ticks(report, t0)
    fs = _fontsize(len(ticks))

    fig = Figure(figsize=(8, 9))
    ax, bx = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1.3]}, sharex=True)
    im = ax.imshow(attn.numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=max(float(attn.max()), 1e-6)))
    for s, _, _ in segs[1:]:
        ax.axvline(s - 0.5, color="w", lw=0.6)
        ax.axhline(s - 0.5, color="w", lw=0.6)
    ax.set_yticks(ticks, names, fontsize=fs)
    ax.set_ylabel("query (the attending token)")
    what = f"mean over the {probs.shape[0]} heads" if head is None else f"head {head}"
    ax.set_title(f"Layer {layer}: attention probabilities, {what} (probe sample 0)\n"
                 f"white lines separate prompt parts (BOS, delimiters, audio, video, instruction, text)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04).set_label("attention probability (square-root colour scale)")

    xs = torch.arange(t0).numpy()
    colors = ["tab:red" if bool(sink[i]) else ("tab:orange" if bool(unscored[i]) else "tab:gray")
              for i in range(t0)]
    bx.bar(xs, alpha.numpy(), color=colors, width=1.0)
    bx.axhline(eps, color="k", ls="--", lw=0.8)
    n_sinks = int(sink.sum())
    if 0 < n_sinks <= 12:       # the fraction of heads in which each sink token is one
        for i in sink.nonzero().flatten().tolist():
            bx.text(i, float(alpha[i]), f"{float(head_frac[i]):.2f}", ha="center", va="bottom", fontsize=6)
    handles = [Patch(color="tab:red", label="sink in this layer" + (" (number: fraction of heads)"
                                                                     if 0 < n_sinks <= 12 else "")),
               Patch(color="tab:gray", label="not a sink")]
    if bool(unscored.any()):
        handles.append(Patch(color="tab:orange", label="over \u03b5 but seen by too few queries"))
    handles.append(Line2D([], [], color="k", ls="--", lw=0.8, label=f"threshold \u03b5 = {eps:g}"))
    bx.legend(handles=handles, fontsize=6, loc="upper right")
    bx.set_ylim(0, 1.08)
    bx.set_ylabel("sink score \u03b1\n" + ("largest over heads" if head is None else f"head {head}"),
                  fontsize=8)
    bx.set_xticks(ticks, names, rotation=60, fontsize=fs, ha="right")
    bx.set_xlabel("key (the attended token)")
    fig.tight_layout()
    return fig


def activation_figure(report: SinkReport, layer: int, maps: LayerMaps, path: Path) -> Path:
    return _save(draw_activations(report, layer, maps), path)


def draw_activations(report: SinkReport, layer: int, maps: LayerMaps) -> Figure:
    """|H| of sample 0's tokens in the layer's largest features, massive ones in red."""
    abs_h = maps.abs_hidden  # [T0, D]
    t0, d = abs_h.shape
    feats = abs_h.max(0).values.topk(min(_TOP_FEATURES, d)).indices.sort().values.tolist()
    stats = report.layer(layer)
    massive = set(stats.massive_features)

    fig = Figure(figsize=(8, 6.5))
    ax = fig.add_subplot(projection="3d")
    xs = list(range(t0))
    for yi, j in enumerate(feats):
        color = "tab:red" if j in massive else "tab:blue"
        ax.bar(xs, abs_h[:, j].numpy(), zs=yi, zdir="y", color=color, alpha=0.8, width=1.0)
    ax.set_yticks(range(len(feats)), [str(j) for j in feats], fontsize=7)
    # name the tokens that carry the largest values (the massive carriers first)
    carriers = [m.token for m in stats.massive_tokens if m.batch == 0][:6]
    if not carriers:
        carriers = abs_h.max(1).values.topk(min(3, t0)).indices.tolist()
    carriers = sorted(set(carriers))
    ax.set_xticks(carriers, [_short(report.label(0, i), 12) for i in carriers], fontsize=6)
    ax.set_xlabel("token (sample 0)", labelpad=8)
    ax.set_ylabel("feature index j")
    ax.set_zlabel("|H[token, j]|")
    ax.set_title(
        f"Layer {layer}: |hidden state| (block output) of the {len(feats)} largest features\n"
        f"max {stats.max_abs:.3g} = {stats.massive_ratio:.3g} x median; massive features "
        f"{sorted(massive) or 'none'}",
        fontsize=9,
    )
    ax.legend(handles=[Patch(color="tab:red", label="massive feature (|H| > 100 and > ratio x median)"),
                       Patch(color="tab:blue", label="other feature")], fontsize=7, loc="upper left")
    return fig


def cosine_figure(report: SinkReport, path: Path) -> Path:
    return _save(draw_cosine(report), path)


def draw_cosine(report: SinkReport) -> Figure:
    """Per layer, mean cos to BOS of that layer's intermediate sink tokens vs the other non-BOS
    tokens: the same numbers as the per-layer summary (cos_to_bos_sink / cos_to_bos_nonsink)."""
    layers = [s.layer for s in report.layers]
    sink_cos = [s.cos_to_bos_sink for s in report.layers]
    other_cos = [s.cos_to_bos_nonsink for s in report.layers]
    counts = [s.intermediate_sink_count for s in report.layers]

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(layers, sink_cos, "o-", color="tab:red", label="intermediate sinks of that layer (mean)")
    ax.plot(layers, other_cos, "s-", color="tab:blue", label="other tokens after BOS (mean)")
    ax.set_ylim(-1.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # layers are whole numbers
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cos(H[BOS], H[token])")
    ax.set_title(f"Cosine similarity of hidden states to BOS's, per layer (mean over "
                 f"{len(report.lengths)} probe sample(s))", fontsize=9)
    fig.text(0.01, 0.01, "red: the tokens that are intermediate sinks in that layer (no point: none there; "
             f"{min(counts):.1f}-{max(counts):.1f} per sample); blue: every other token after BOS",
             fontsize=7, color="0.3")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def bos_heads_figure(report: SinkReport, path: Path) -> Path:
    return _save(draw_bos_heads(report), path)


def draw_bos_heads(report: SinkReport) -> Figure:
    """Sink score of BOS per (layer, head), mean over samples; dots where it is over epsilon."""
    grid = torch.stack([s.sink_scores[:, :, 0].mean(0) for s in report.layers])  # [L, H]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1)
    over = (grid > report.sink_epsilon).nonzero()
    if over.numel():
        ax.scatter(over[:, 1].numpy(), over[:, 0].numpy(), s=6, c="tab:cyan")
    ax.set_yticks(range(len(report.layers)), [str(s.layer) for s in report.layers], fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # heads are whole numbers
    ax.set_xlabel("attention head")
    ax.set_ylabel("decoder layer")
    ax.set_title(f"Sink score of BOS per layer and head (mean over {len(report.lengths)} probe sample(s))\n"
                 f"cyan dot: score > \u03b5 = {report.sink_epsilon:g}, BOS is a sink in that head", fontsize=9)
    fig.colorbar(im, ax=ax).set_label("sink score \u03b1 of BOS")
    fig.tight_layout()
    return fig


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
