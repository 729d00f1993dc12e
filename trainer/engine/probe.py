"""The sink monitor's probe on the Llama-AVSR model: one fixed batch, the model's own prompt.

Shared by the training loop (`Trainer._setup_monitor` / `_probe_sinks`) and the offline
`launch/analyze_sinks.py`, so both probe the same rows, assembled the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.data.config import DataConfig, Streams
from trainer.model.prompt import AssembledInputs
from trainer.model.prompt_text import with_transcript_ids
from trainer.monitor.analysis import SinkReport
from trainer.monitor.labels import token_labels
from trainer.monitor.monitor import FigureQueue, SinkMonitor


def first_eval_batch(data_cfg: DataConfig, streams: Streams, split: str, size: int) -> dict:
    """The probe batch: the first `size` clips of the first batch of a single-rank, deterministic
    pass over `split` (fewer when that batch is smaller). The skip counters are dropped."""
    from trainer.data.pipeline import build_eval_loader

    batch = next(iter(build_eval_loader(data_cfg, streams, split, rank=0, world_size=1)), None)
    if batch is None:
        raise RuntimeError(f"split {split!r} of {data_cfg.shard_dir} gave no batch for the sink probe")
    return {k: (v[:size] if isinstance(v, (torch.Tensor, list)) else v)
            for k, v in batch.items() if k != "skipped"}


def run_probe(monitor: SinkMonitor, model, tokenizer, batch: dict, step: int, out_dir: str | Path | None,
              step_subdir: bool = True, figure_queue: FigureQueue | None = None) -> tuple[SinkReport, AssembledInputs]:
    """Assemble the training prompt for `batch` (already on the model's device; its transcripts are
    tokenized here) and probe the LLM on it. Under ZeRO-3 every rank must call this on the same step."""
    with torch.no_grad():
        parts = model.assemble(with_transcript_ids(tokenizer, batch))
    lengths = parts.attention_mask.sum(1)
    labels = token_labels(parts.input_ids, parts.token_roles, lengths, tokenizer)
    report = monitor.run(model.llm, parts.inputs_embeds, parts.attention_mask, parts.token_roles,
                         step=step, out_dir=out_dir, step_subdir=step_subdir,
                         figure_queue=figure_queue, token_labels=labels)
    return report, parts
