"""SinkMonitor: the training loop's entry point for the attention-sink / massive-activation probe."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.monitor.analysis import SinkAnalyzer, SinkReport, lengths_from_mask
from trainer.monitor.capture import capture_layers, find_decoder, probe_forward
from trainer.monitor.config import MonitorConfig, resolve_layers
from trainer.monitor.figures import write_figures


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class SinkMonitor:
    """Runs one probe forward every `cfg.every` steps and turns it into a `SinkReport`.

    Under DeepSpeed ZeRO-3 every rank must call `run` on the same steps (the probe forward
    all-gathers the partitioned weights); each rank analyses its own probe rows, and only
    rank 0 writes files.
    """

    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg

    def should_run(self, step: int) -> bool:
        return self.cfg.every > 0 and step % self.cfg.every == 0

    def run(
        self,
        llm: nn.Module,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        token_roles: torch.Tensor | None = None,
        step: int = 0,
        out_dir: str | Path | None = None,
        step_subdir: bool = True,
    ) -> SinkReport:
        """Probe `llm` (LlamaForCausalLM, possibly a PeftModel) on the first rows of a batch.

        inputs_embeds [B, T, D], attention_mask [B, T] (right-padded, BOS at 0), token_roles
        [B, T] (TokenRole values; None = text-only: BOS at 0, text elsewhere). The model is put
        in eval mode and eager attention for the probe and restored afterwards. With out_dir,
        rank 0 writes `out_dir/step_XXXXXXX/{report.json, *.png}` (listed in `report.files`);
        step_subdir=False writes them straight into out_dir.
        """
        cfg = self.cfg
        n = min(cfg.probe_batch_size, inputs_embeds.shape[0])
        mask = attention_mask[:n]
        t = int(lengths_from_mask(mask).max())  # drop columns that are padding in every probe row
        mask = mask[:, :t]
        embeds = inputs_embeds[:n, :t].detach()
        roles = None if token_roles is None else token_roles[:n, :t]

        num_layers = len(find_decoder(llm).layers)
        layers = resolve_layers(cfg.layers, num_layers)
        writes = out_dir is not None and _is_rank_zero()
        figure_layers = set()
        if writes and cfg.figures:
            figure_layers = set(resolve_layers(cfg.figure_layers, num_layers, strict=False)) & set(layers)

        analyzer = SinkAnalyzer(cfg, mask, roles, figure_layers)
        with capture_layers(llm, analyzer, layers) as decoder:
            probe_forward(decoder, embeds, mask)
        report = analyzer.report(step)

        if writes:
            folder = Path(out_dir) / f"step_{step:07d}" if step_subdir else Path(out_dir)
            folder.mkdir(parents=True, exist_ok=True)
            json_path = folder / "report.json"
            json_path.write_text(json.dumps(report.to_json(), indent=1))
            report.files.append(json_path)
            if cfg.figures:
                report.files.extend(write_figures(report, None, folder, head=cfg.figure_head))
            report.maps.clear()  # the figures are written; do not keep the maps alive
        return report
