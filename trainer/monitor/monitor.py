"""SinkMonitor: the training loop's entry point for the attention-sink / massive-activation probe."""
from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from trainer import distributed
from trainer.helper_signals import ignore_stop_signals, stop_signals_blocked
from trainer.monitor.analysis import LayerMaps, SinkAnalyzer, SinkReport, lengths_from_mask
from trainer.monitor.capture import capture_layers, find_decoder, probe_forward
from trainer.monitor.config import MonitorConfig, resolve_layers
from trainer.monitor.figures import write_figures


log = logging.getLogger(__name__)


class FigureQueue:
    """Draws the probe figures in one background process, so a probe costs the training loop
    only its forward and analysis (the figures are ~95% of a probe's time on CPU, and drawn on
    the CPU whatever the accelerator). `finished()` hands back what has been written.

    SLURM signals every process of a job: the pool's processes (and multiprocessing's resource
    tracker) are started with SIGTERM/SIGUSR1 blocked and then ignore them, so a stop leaves the
    pool alive and `close()` still collects the figures of the step being drawn."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None
        self._pending: list[tuple[int, Future]] = []

    def submit(self, report: SinkReport, folder: Path, head: int | None) -> None:
        maps = {k: LayerMaps(m.attn_probs.cpu().clone(), m.abs_hidden.cpu().clone()) for k, m in report.maps.items()}
        light = replace(report, maps={}, files=[])
        if self._pool is None:
            from multiprocessing import resource_tracker
            with stop_signals_blocked():    # started now, so it inherits the blocked signals (it
                resource_tracker.ensure_running()   # unblocks SIGTERM here when done: a block of its own)
        with stop_signals_blocked():     # the pool may start (or restart) a process here
            if self._pool is None:
                import multiprocessing as mp
                # spawn: a forked copy of a DeepSpeed/CUDA process is not safe to draw in
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                                 initializer=ignore_stop_signals)
            future = self._pool.submit(write_figures, light, maps, folder, head)
        self._pending.append((report.step, future))

    def finished(self, wait: bool = False) -> list[tuple[int, list[Path]]]:
        """(step, files) of the figure sets done so far (all of them with wait=True). A failed
        drawing is logged and skipped: figures must never stop a run."""
        done, still = [], []
        for step, fut in self._pending:
            if wait or fut.done():
                try:
                    done.append((step, fut.result()))
                except Exception as err:    # noqa: BLE001 - report, keep training
                    log.warning("sink figures for step %d failed: %s", step, err)
            else:
                still.append((step, fut))
        self._pending = still
        return done

    def close(self, timeout: float | None = None) -> list[tuple[int, list[Path]]]:
        """Wait for the pending figures and end the pool. With a timeout (after a stop signal: SLURM
        kills the job KillWait seconds after its SIGTERM, 30 s by default) figure sets not drawn by
        then are abandoned, and the pool process is killed so that exit does not wait for it."""
        if timeout is not None and self._pending:
            wait_futures([fut for _, fut in self._pending], timeout=timeout)
        done = self.finished(wait=timeout is None)
        if self._pool is not None:
            if self._pending:
                log.warning("sink figures for step(s) %s not drawn within %.0f s of the stop: abandoned "
                            "(their report.json is complete)", [step for step, _ in self._pending], timeout)
                for proc in list((getattr(self._pool, "_processes", None) or {}).values()):
                    proc.kill()         # it ignores SIGTERM (see the class docstring)
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pending = []
            else:
                self._pool.shutdown()
            self._pool = None
        return done


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
        figure_queue: FigureQueue | None = None,
        token_labels: list[list[str]] | None = None,
    ) -> SinkReport:
        """Probe `llm` (LlamaForCausalLM, possibly a PeftModel) on the first rows of a batch.

        inputs_embeds [B, T, D], attention_mask [B, T] (right-padded, BOS at 0), token_roles
        [B, T] (TokenRole values; None = text-only: BOS at 0, text elsewhere). The model is put
        in eval mode and eager attention for the probe and restored afterwards. With out_dir,
        rank 0 writes `out_dir/step_XXXXXXX/{report.json, *.png}` (listed in `report.files`);
        step_subdir=False writes them straight into out_dir. With a `figure_queue` the PNGs are
        drawn in the background and `report.files` lists only the JSON. token_labels (per row, one
        label per real token, e.g. from `trainer.monitor.labels.token_labels`) name the tokens in
        report.json and on the figures' axes; without them tokens are named by role and position.
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
        writes = out_dir is not None and distributed.is_rank_zero()
        figure_layers = set()
        if writes and cfg.figures:
            figure_layers = set(resolve_layers(cfg.figure_layers, num_layers, strict=False)) & set(layers)

        analyzer = SinkAnalyzer(cfg, mask, roles, figure_layers)
        with capture_layers(llm, analyzer, layers) as decoder:
            probe_forward(decoder, embeds, mask)
        report = analyzer.report(step, None if token_labels is None else [list(r) for r in token_labels[:n]])

        if writes:
            folder = Path(out_dir) / f"step_{step:07d}" if step_subdir else Path(out_dir)
            folder.mkdir(parents=True, exist_ok=True)
            json_path = folder / "report.json"
            json_path.write_text(json.dumps(report.to_json(), indent=1))
            report.files.append(json_path)
            if cfg.figures and figure_queue is not None:
                figure_queue.submit(report, folder, cfg.figure_head)
            elif cfg.figures:
                report.files.extend(write_figures(report, None, folder, head=cfg.figure_head))
            report.maps.clear()  # the figures are written; do not keep the maps alive
        return report
