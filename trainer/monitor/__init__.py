"""Attention-sink and massive-activation monitor (DESIGN.md section 2)."""
from trainer.monitor.analysis import LayerStats, SinkReport, sink_scores
from trainer.monitor.capture import capture_layers, find_decoder
from trainer.monitor.config import MonitorConfig
from trainer.monitor.figures import write_figures
from trainer.monitor.monitor import SinkMonitor

__all__ = [
    "LayerStats",
    "MonitorConfig",
    "SinkMonitor",
    "SinkReport",
    "capture_layers",
    "find_decoder",
    "sink_scores",
    "write_figures",
]
