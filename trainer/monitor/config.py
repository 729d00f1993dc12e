"""Configuration of the attention-sink / massive-activation monitor (DESIGN.md section 2)."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config_checks import Problems


@dataclass
class MonitorConfig:
    every: int = 200
    """Run the probe every N optimiser steps, and once before the first (step 0) of a fresh run; 0 = off."""

    sink_epsilon: float = 0.3
    """Token k is a sink in (layer, head) when its sink score alpha^{l,h}_k > epsilon (Gu et al. 2024)."""

    sink_min_queries: int = 8
    """Only keys that at least min(sink_min_queries, T_b // 4) real queries can see are classified as
    sinks (T_b: the sample's length; BOS always is). The literal score of the last token is its
    attention to itself, of the one before a mean over two queries: heads that attend locally push
    the last tokens over epsilon in almost every layer. The scores themselves (report, figures) are
    unchanged; 1 = classify every key."""

    massive_abs: float = 100.0
    """Absolute threshold: a massive activation has |H^l[i, j]| > massive_abs (Sun et al. 2024)."""

    massive_ratio: float = 1000.0
    """Relative threshold tau: |H^l[i, j]| > tau * median(|H^l|) over the real tokens of the layer."""

    top_k: int = 10
    """How many of the largest |H^l| entries (with batch, token, feature) to report per layer."""

    probe_batch_size: int = 4
    """Rows of the batch used by the probe forward (the first ones); keeps the cost low."""

    layers: tuple[int, ...] | None = None
    """Decoder layers to analyse (negative = from the end); None = all layers."""

    figures: bool = True
    """Write PNG figures (attention maps, activation magnitudes, cosine to BOS) when an out_dir is given."""

    figure_layers: tuple[int, ...] = (0, 1, 2, -1)
    """Layers drawn in the per-layer figures; only these keep full attention maps in memory."""

    figure_head: int | None = None
    """Head drawn in the attention-map figures; None = mean over heads."""

    max_massive_entries: int = 4096
    """Cap on the massive (batch, token, feature) entries kept per layer (the largest ones are kept)."""

    def __post_init__(self) -> None:
        # YAML/JSON configs give lists: normalise to tuples so the dataclass stays typed.
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
        self.figure_layers = tuple(int(x) for x in self.figure_layers)
        p = Problems("monitor")
        p.at_least(self, ("every",), 0, integer=True)
        p.check(0.0 < self.sink_epsilon < 1.0, "sink_epsilon", f"must be in (0, 1), got {self.sink_epsilon}")
        p.at_least(self, ("sink_min_queries", "top_k", "probe_batch_size", "max_massive_entries"), 1, integer=True)
        p.at_least(self, ("massive_abs",), 0)
        p.at_least(self, ("massive_ratio",), 1)
        p.check(self.layers is None or len(self.layers) > 0, "layers", "must be left out (all layers) or non-empty")
        if self.figure_head is not None:
            p.at_least(self, ("figure_head",), 0, integer=True)
        p.raise_any()

    @property
    def enabled(self) -> bool:
        return self.every > 0


def resolve_layers(indices: tuple[int, ...] | None, num_layers: int, strict: bool = True) -> list[int]:
    """Turn possibly negative layer indices into a sorted, de-duplicated list in [0, num_layers).

    strict=False drops out-of-range indices (figure layers on a model shallower than the default)."""
    if indices is None:
        return list(range(num_layers))
    out = set()
    for i in indices:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            if not strict:
                continue
            raise ValueError(f"layer index {i} out of range for a model with {num_layers} layers")
        out.add(j)
    return sorted(out)
