"""Attention-sink and massive-activation monitor (DESIGN.md section 2).

Public API, imported lazily so that `trainer.monitor.config` (read by the experiment config's parse
step, before any process group) stays free of torch: LayerStats, MonitorConfig, SinkMonitor,
SinkReport, capture_layers, find_decoder, sink_scores, write_figures.
"""
from importlib import import_module

_EXPORTS = {
    "LayerStats": "analysis", "SinkReport": "analysis", "sink_scores": "analysis",
    "capture_layers": "capture", "find_decoder": "capture", "MonitorConfig": "config",
    "write_figures": "figures", "SinkMonitor": "monitor",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
