"""The training loop: build, resume, step, log, probe, evaluate, checkpoint, export.

`Trainer(cfg).train()` is the whole run; launch/train.py is only its entry point.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from trainer import distributed
from trainer.config import ExperimentConfig, final_eval_splits
from trainer.device import DeviceError, settle_device
from trainer.data.skips import NOTE_REASONS, RETRY_REASONS, SKIP_REASONS, metric_name, skip_report, skip_summary
from trainer.data.stream import TrainStream
from trainer.engine.checkpoint import CheckpointManager, SaveFailed, frozen_weight_sums, seed_everything
from trainer.engine.ds_config import (describe_optimizer, load_ds_config, op_prebuilt, resolve_ds_config, use_bf16,
                                     zero_stage)
from trainer.engine.evaluate import EvalInterrupted, PeriodicEval, evaluate_loss, evaluate_wer
from trainer.engine.export import export_consolidated, export_trainable
from trainer.engine.loss import (LOGGED, GlobalCounts, backward, check_counts, decorrelation_ramp, micro_batch_share,
                                 term_grad_norms, term_gradients)
from trainer.engine.schedule import warmup_cosine
from trainer.engine.signals import StopSignal
from trainer.engine.flops import StepFlops
from trainer.engine.throughput import ThroughputMeter, peak_memory_gb
from trainer.tracking.tracker import describe_run, shard_datasets, tracker_for_run
from trainer.model.prompt_text import with_transcript_ids

log = logging.getLogger("trainer")
FIGURE_DRAIN_AFTER_STOP_S = 10.0     # of SLURM's 30 s KillWait, after the checkpoint
FINAL_STAGES = "final_stages.json"     # the final export/evaluations completed so far (see _finish)
# A run ends in MLflow's words: FINISHED, FAILED, or KILLED (stopped early and resumable with the same
# command); the result dict says what stopped it.
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


def _all_sum(values: list[float], device) -> list[float]:
    return distributed.all_reduce_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def _all_sum_counts(counts: dict[str, int], device) -> dict[str, int]:
    """Per-reason counts summed over ranks (each rank's already sums its DataLoader workers)."""
    reasons = list(SKIP_REASONS + NOTE_REASONS + RETRY_REASONS)
    unknown = sorted(set(counts) - set(reasons))
    t = torch.tensor([counts.get(r, 0) for r in reasons] + [sum(counts[r] for r in unknown)],
                     dtype=torch.float64, device=device)
    distributed.all_reduce_(t)
    out = {r: int(n) for r, n in zip(reasons, t.tolist()) if n}
    if t[-1]:
        out["other"] = out.get("other", 0) + int(t[-1])
    return out


class Trainer:
    def __init__(self, cfg: ExperimentConfig):
        self.device_decision = settle_device(cfg.train.device)    # before deepspeed reads DS_ACCELERATOR
        import deepspeed

        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir)
        deepspeed.init_distributed()
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.ckpt = CheckpointManager(self.run_dir, cfg.train.keep_last, self.rank, self.world_size,
                                      every=cfg.train.save_every)
        self.periodic_eval = PeriodicEval(every=cfg.train.eval_every, max_steps=cfg.train.max_steps)
        self.periodic_loss = PeriodicEval(every=cfg.train.val_loss_every, max_steps=cfg.train.max_steps)
        self.ckpt.check_start(cfg.train.resume)       # before anything is built, written or logged
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = self._pick_device()
        self.on_cpu = self.device.type == "cpu"
        raw_ds_config = load_ds_config(cfg.config)
        self.bf16 = use_bf16(cfg.train.precision, raw_ds_config, on_cpu=self.on_cpu,
                             bf16_supported=self.on_cpu or torch.cuda.is_bf16_supported())
        seed_everything(cfg.train.seed)     # same init on every rank; zero.Init partitions it

        from trainer.model import build_model, llm_hidden_size
        from trainer.model.avsr import build_tokenizer

        cfg.model = self._prepare_tokenizer(cfg)
        self.tokenizer = build_tokenizer(cfg.model)     # text <-> ids here; the model takes ids only

        self.ds_config = resolve_ds_config(
            raw_ds_config, hidden_size=llm_hidden_size(cfg.model),
            micro_batch_size=cfg.data.max_batch_size, grad_accum=cfg.train.grad_accum,
            grad_clip=cfg.train.grad_clip, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            total_steps=cfg.train.max_steps, warmup_steps=cfg.train.warmup_steps,
            min_lr_ratio=cfg.train.min_lr_ratio, bf16=self.bf16, on_cpu=self.on_cpu,
            fused_adam_prebuilt=op_prebuilt("fused_adam"))
        self.zero3 = zero_stage(self.ds_config) == 3
        if self.rank == 0:
            log.info("precision %s (trainable weights %s, fp32 master weights and Adam moments in the optimizer, "
                     "losses summed in fp32); optimizer: %s", "bf16" if self.bf16 else "fp32",
                     "bf16" if self.bf16 else "fp32", describe_optimizer(self.ds_config))
        model = build_model(cfg.model, ds_config=self.ds_config, tokenizer=self.tokenizer)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.ds_engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config, lr_scheduler=self._lr_schedule())
        self.model = self.ds_engine.module
        self.param_counts = self._count_params()
        self.step_flops = StepFlops.from_model(self.model, cfg.data.crop_size)
        self.frozen_fingerprint = self._frozen_fingerprint()

        self.tracker = tracker_for_run(self.rank, self.run_dir, cfg.tracking,
                                       describe_run(cfg.to_dict(), self.world_size) if self.rank == 0 else None)
        self.stop = StopSignal().install()
        self.step = 0
        self.stream: TrainStream | None = None
        self.monitor = None
        self.figure_queue = None     # rank 0: sink figures drawn in a background process
        self.probe_batch = None
        self.untrained: dict | None = None
        self.skipped_total: Counter = Counter()     # training samples skipped, all ranks

    # ---- the story of a run ----------------------------------------------------------------------
    def train(self) -> dict:
        status = FAILED
        try:
            self._check_eval_splits()
            self._resume_or_start()
            self._log_run_setup()
            if self.step == 0 and self.cfg.train.eval_untrained:
                self.untrained = self._evaluate(self.cfg.data.test_split, None, tag="untrained")
            if self.step == 0 and self.monitor is not None:
                self._probe_sinks()          # step 0: the pretrained LLM's sinks, the baseline to compare with
            if self.step == 0 and self.cfg.train.val_loss_every:
                self._validation_loss()      # the curve's first point
            meter = ThroughputMeter(self.world_size)
            start = self.step
            while self.step < self.cfg.train.max_steps:
                stats = self._train_step(meter)
                self.step += 1
                if self.is_log_step(self.step):
                    self._log_step(stats, meter)
                if self.monitor is not None and self.monitor.should_run(self.step):
                    self._probe_sinks()
                if self.periodic_eval.should_run(self.step):
                    self._evaluate(self.cfg.data.eval_split, self.cfg.train.eval_max_samples)
                if self.periodic_loss.should_run(self.step) or (self.periodic_loss.every
                                                                and self.step == self.cfg.train.max_steps):
                    self._validation_loss()          # the curve ends at the last step
                if self.ckpt.should_run(self.step):
                    self._save()
                if self.stop.agreed(self.device):
                    self._save()
                    status = KILLED
                    log.warning("stopped by signal at step %d; resume with the same command", self.step)
                    return {"step": self.step, "status": status, "stopped_by": "signal"}
                stop_after = self.cfg.train.stop_after
                if stop_after and self.step - start >= stop_after and self.step < self.cfg.train.max_steps:
                    self._save()
                    status = KILLED
                    log.info("stop_after=%d reached at step %d; resume with the same command", stop_after, self.step)
                    return {"step": self.step, "status": status, "stopped_by": "stop_after"}
            results = self._finish()
            status = FINISHED
            return {**results, "status": status}
        except EvalInterrupted as stopped:
            # The checkpoint of this step is complete unless we were still before the first save.
            if self.step > 0:
                self._save()             # returns at once if this step's checkpoint is already written
            status = KILLED
            log.warning("%s; checkpoint at step %d; resume with the same command", stopped, self.step)
            return {"step": self.step, "status": status, "stopped_by": "signal during evaluation"}
        except SaveFailed as failed:         # FAILED, and why, where the run is looked at
            self.tracker.set_tags({"failure": str(failed)[:5000]})
            raise
        except KeyboardInterrupt:
            status = KILLED
            raise
        finally:
            # The handler stays until the end: a second SIGTERM must not kill the process while it
            # winds down (SLURM, the launcher and job.sh may each deliver one).
            if self.stream is not None:
                self.stream.close()      # its workers ignore SIGTERM: end them before exit
            if self.figure_queue is not None:   # after a stop, only what can be drawn within the grace time
                self._log_sink_files(self.figure_queue.close(
                    timeout=FIGURE_DRAIN_AFTER_STOP_S if self.stop.received is not None else None))
            self.tracker.finish(status)
            self.stop.uninstall()

    def _finish(self) -> dict:
        cfg = self.cfg
        self._save()                     # returns at once if this step's checkpoint is already written
        results: dict = {"step": self.step}
        # Each final stage is recorded in the run folder once complete: a stop during the final
        # evaluations brings the requeued job back here at the same step, and it must neither lose
        # nor redo (and log twice) what was already finished.
        done = self._final_stages()
        if cfg.train.export_on_finish and "export" not in done:
            written = export_trainable(self.model, self.run_dir / "export", self.rank)
            export_consolidated(self.ds_engine, self.run_dir / "export")
            if self.rank == 0:
                for path in written.values():
                    self.tracker.log_artifact(path, "export")
            self._final_stage_done(done, "export", True)
        beams = cfg.train.final_eval_beams or cfg.train.eval_beams
        for split in final_eval_splits(cfg):
            if split not in done:
                self._final_stage_done(done, split, self._evaluate(split, cfg.train.final_eval_max_samples,
                                                                   num_beams=beams))
            else:
                log.info("final %s evaluation at step %d already done before a restart: kept",
                         split, self.step)
            results[split] = done[split]
        if self.untrained is not None:
            results["test_untrained"] = self.untrained
        results["data_skipped"] = self._skip_account()
        if self.rank == 0:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            self.tracker.log_artifact(self.run_dir / "results.json")
        return results

    def _skip_account(self) -> dict:
        """Training data skipped over this process's steps, all ranks (each split's evaluation reports its
        own under "skipped/..."), logged as the run's last word on data."""
        report = skip_report(self.skipped_total)
        if self.rank == 0:
            log.info("data skipped in training, all ranks: %s", report["summary"])
        return report

    def _final_stages(self) -> dict:
        """The final stages completed at this step by an earlier, stopped, attempt (rank 0's file,
        broadcast so that every rank skips the same collectives)."""
        stages: dict = {}
        path = self.run_dir / FINAL_STAGES
        if self.rank == 0 and path.is_file():
            saved = json.loads(path.read_text())
            stages = saved.get("stages", {}) if saved.get("step") == self.step else {}
        return distributed.broadcast_object(stages, src=0)

    def _final_stage_done(self, done: dict, name: str, value) -> None:
        done[name] = value
        if self.rank == 0:
            path = self.run_dir / FINAL_STAGES
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": self.step, "stages": done}, indent=1))
            os.replace(tmp, path)

    # ---- setup -------------------------------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        if acc.device_name() != self.device_decision.device:     # deepspeed was imported before the decision
            raise DeviceError(f"DeepSpeed's accelerator is {acc.device_name()} but {self.device_decision.line()}")
        if acc.device_name() == "cpu":
            return torch.device("cpu")
        acc.set_device(self.local_rank)
        return torch.device(acc.device_name(), self.local_rank)

    def _prepare_tokenizer(self, cfg: ExperimentConfig):
        """The tiny LLM's BPE tokenizer, trained on the training transcripts by rank 0 and saved in the
        run folder (reused on resume, so token ids never change under a checkpoint)."""
        mcfg = cfg.model
        if mcfg.llm_path or mcfg.tokenizer_path or mcfg.tiny.tokenizer != "bpe":
            return mcfg
        folder = self.run_dir / "tokenizer"
        if self.rank == 0 and not (folder / "tokenizer.json").is_file():
            from trainer.data.text import TranscriptCount, iter_transcripts
            from trainer.model.tokenizer import train_bpe_tokenizer
            count = TranscriptCount()
            texts = list(iter_transcripts(cfg.data.shard_dir, cfg.data.train_split, count))
            if not texts:
                raise RuntimeError(f"no transcripts in {cfg.data.shard_dir} split {cfg.data.train_split} "
                                   f"({count.describe()})")
            tmp = folder.with_name("tokenizer.tmp")
            train_bpe_tokenizer(texts, vocab_size=mcfg.tiny.tokenizer_vocab).save_pretrained(str(tmp))
            if folder.exists():                 # debris of an interrupted earlier attempt
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            log.info("trained a %d-token BPE tokenizer on %s of split %s -> %s",
                     mcfg.tiny.tokenizer_vocab, count.describe(), cfg.data.train_split, folder)
            if count.used < count.expected:
                log.warning("tokenizer: %d of the %d training samples gave no transcript (missing, empty or in "
                            "an unreadable shard)", count.expected - count.used, count.expected)
        distributed.barrier()
        return dataclasses.replace(mcfg, tokenizer_path=str(folder))

    def _lr_schedule(self):
        """The trainer's warmup + cosine schedule (trainer/engine/schedule.py), built by DeepSpeed on its
        optimizer; None when the DeepSpeed JSON names its own scheduler, which DeepSpeed then builds."""
        sched = self.ds_config.get("scheduler")
        if sched is not None:
            if self.rank == 0:
                log.warning("DeepSpeed JSON scheduler %s is used (--train.warmup-steps/--train.min-lr-ratio only fill "
                            "its \"auto\" values); drop the \"scheduler\" section for the trainer's own schedule",
                            sched.get("type"))
            return None
        t = self.cfg.train
        return lambda optimizer: warmup_cosine(optimizer, warmup_steps=t.warmup_steps, total_steps=t.max_steps,
                                               min_lr_ratio=t.min_lr_ratio)

    def _count_params(self) -> dict[str, int]:
        def numel(p):
            return p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        counts = {"trainable": 0, "llm": 0, "encoders": 0, "total": 0}
        for name, p in self.model.named_parameters():
            n = numel(p)
            counts["total"] += n
            counts["trainable"] += n if p.requires_grad else 0
            if name.startswith("llm."):
                counts["llm"] += n
            elif "encoder" in name:
                counts["encoders"] += n
        return counts

    def _local_param_fraction(self) -> float:
        """Share of all parameter elements this rank stores: ~1/world_size under ZeRO-3, 1 otherwise."""
        local = total = 0
        for p in self.model.parameters():
            total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return local / max(total, 1)

    def _frozen_fingerprint(self) -> list[float]:
        """Sum and sum of squares of the frozen weights, from each rank's slice (no gather).

        Checkpoints hold what DeepSpeed trains; the frozen base comes from the model's
        sources on every start, so a resume checks that those sources did not change."""
        s = frozen_weight_sums(self.model)
        if self.zero3:
            s = distributed.all_reduce_(s.to(self.device))
        return [float(x) for x in s.cpu()]

    def _make_train_loader(self, epoch: int):
        from trainer.data.pipeline import build_train_loader
        return build_train_loader(self.cfg.data, self.model.input_streams, rank=self.rank, world_size=self.world_size,
                                  epoch=epoch)

    def _resume_or_start(self) -> None:
        cfg = self.cfg
        folder = self.ckpt.resolve(cfg.train.resume)
        state = None
        if folder is not None:
            state = self.ckpt.load(self.ds_engine, folder)
            saved_fp = state.trainer_state.get("frozen_fingerprint")
            if saved_fp and not np.allclose(saved_fp, self.frozen_fingerprint, rtol=1e-6):
                raise RuntimeError(
                    f"the frozen weights differ from those the checkpoint {folder} was trained on "
                    f"({saved_fp} vs {self.frozen_fingerprint}): same pretrained paths and seed needed")
            self.step = state.step
            log.info("resumed from %s at step %d", folder, self.step)
        self.stream = TrainStream.from_state(self._make_train_loader, state.rank_state.get("data") if state else None,
                                             fast_forward=cfg.train.fast_forward_data)
        self._setup_monitor()

    def _setup_monitor(self) -> None:
        mcfg = self.cfg.monitor
        if not mcfg.every:
            return
        from trainer.engine.probe import first_eval_batch
        from trainer.monitor.monitor import SinkMonitor
        self.monitor = SinkMonitor(mcfg)
        if self.rank == 0 and mcfg.figures:
            from trainer.monitor.monitor import FigureQueue
            self.figure_queue = FigureQueue()
        # A fixed probe batch: the first validation batch of rank 0's stream, broadcast so every
        # rank runs the identical probe forward (ZeRO-3 needs all ranks in it anyway).
        batch = None
        if self.rank == 0:
            batch = first_eval_batch(self.cfg.data, self.model.input_streams, self.cfg.data.eval_split,
                                     mcfg.probe_batch_size)
        self.probe_batch = distributed.broadcast_object(batch, src=0)

    def _log_run_setup(self) -> None:
        if self.rank != 0:
            return
        cfg_dict = self.cfg.to_dict()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "experiment.json").write_text(json.dumps(cfg_dict, indent=2, default=str))
        (self.run_dir / "ds_config.resolved.json").write_text(json.dumps(self.ds_config, indent=2))
        from trainer.model.hub import pretrained_sources

        pretrained = {part: r.params() for part, r in pretrained_sources(self.cfg.model).items()}
        self.tracker.log_params({**cfg_dict, "world_size": self.world_size, "pretrained": pretrained,
                                 "params": self.param_counts, "device": str(self.device)})
        self.tracker.log_metrics({"zero/local_param_fraction": self._local_param_fraction()}, self.step)
        self.tracker.log_artifact(self.run_dir / "experiment.json", "config")
        self.tracker.log_artifact(self.run_dir / "ds_config.resolved.json", "config")
        self.tracker.log_datasets(shard_datasets(self.cfg.data))
        log.info("params: %s; world size %d on %s", self.param_counts, self.world_size, self.device)
        if self.zero3 and self.cfg.model.decorrelation_weight > 0:
            log.info("the CE and lambda*L_dec gradient norms are not measured under ZeRO-3 (partitioned parameters); "
                     "ZeRO-2 (ds_configs/zero2.json) logs them as train/grad_norm_ce and train/grad_norm_dec")

    # ---- one optimizer step ------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        from trainer.model.avsr import batch_to_device
        return batch_to_device(batch, self.device)

    def next_micro_batches(self) -> list[dict]:
        """The step's grad_accum micro-batches, their transcripts tokenized (the model takes ids)."""
        return [with_transcript_ids(self.tokenizer, next(self.stream)) for _ in range(self.cfg.train.grad_accum)]

    def is_log_step(self, step: int) -> bool:
        """Whether the metrics of the step that ends at `step` (1-based) are logged: every log_every-th, the
        first (where every curve starts: the decorrelation term is largest against CE there) and the last."""
        return step % self.cfg.train.log_every == 0 or step in (1, self.cfg.train.max_steps)

    def _train_step(self, meter: ThroughputMeter) -> dict:
        """One optimizer step over the global batch: token means over all its micro-batches and ranks
        (trainer/engine/loss.py). Returns this rank's shares of the logged values and the lr used.

        Nothing between a forward and its backward reads a device value on the host. The step's host
        syncs: the all-reduce of the token counts before the first forward (the loss weights need the
        global counts), and after the backward of each micro-batch the check of its counts and the
        throughput figures, then the logged values once per step. On log steps the gradient norms of
        the cross-entropy and of lambda * L_dec alone are measured too, unless ZeRO-3 partitions the
        parameters (loss.term_grad_norms: one more backward per term), so that a run shows which term
        drives the update."""
        self.ds_engine.train()
        batches = self.next_micro_batches()
        local = [self.model.token_counts(b) for b in batches]
        counts = GlobalCounts.all_reduced(local, self.device)
        shares = []
        lr = float(self.ds_engine.get_lr()[0])       # before ds_engine.step(): the lr this step trains with
        ramp = decorrelation_ramp(self.step, self.cfg.model.decorrelation_warmup_steps)
        # Measured on a forward of its own (loss.term_gradients), before the step changes the weights;
        # not under ZeRO-3, whose partitioned parameters are empty outside its forward (said at the start).
        measure = self.is_log_step(self.step + 1) and not self.zero3 and self.cfg.model.decorrelation_weight > 0
        grads: dict[str, torch.Tensor | None] = {"ce": None, "dec": None}    # summed over micro-batches
        for batch, expected in zip(batches, local):
            if measure:
                for name, g in term_gradients(self.model, self.to_device(batch), counts, expected, ramp).items():
                    if g is not None:
                        grads[name] = g if grads[name] is None else grads[name] + g
            out = self.ds_engine(self.to_device(batch))
            loss, share = micro_batch_share(out, counts, expected, ramp)
            backward(self.ds_engine, loss)
            self.ds_engine.step()
            shares.append(share)
            check_counts(out, expected)
            meter.update(len(batch["keys"]), int(out.num_input_tokens), self.step_flops(
                out.input_lengths.tolist(), int(out.num_target_tokens),
                audio_lengths=batch["audio_lengths"].tolist() if "audio_lengths" in batch else (),
                video_lengths=batch["video_lengths"].tolist() if "video_lengths" in batch else ()))
        meter.step()
        sums = dict(zip(LOGGED, torch.stack(shares).sum(0).tolist()))
        gn = self.ds_engine.get_global_grad_norm()
        term_norms = term_grad_norms(grads, self.device) if measure else {}
        return {**sums, "grad_norm": float(gn) if gn is not None else float("nan"), "lr": lr,
                "decorrelation_weight": self.cfg.model.decorrelation_weight * ramp,
                **{f"grad_norm_{k}": v for k, v in term_norms.items()}}

    def step_values(self, stats: dict) -> dict:
        """The step's logged values from every rank's shares (a collective: all ranks call it)."""
        reduced = dict(zip(LOGGED, _all_sum([stats[k] for k in LOGGED], self.device)))
        same = ("grad_norm", "lr", "decorrelation_weight", "grad_norm_ce", "grad_norm_dec")
        return {**reduced, **{k: stats[k] for k in same if k in stats}}     # the same on every rank

    def _log_step(self, stats: dict, meter: ThroughputMeter) -> None:
        reduced = self.step_values(stats)
        metrics = {f"train/{k}": v for k, v in reduced.items()}
        metrics.update(meter.rates())
        metrics.update(peak_memory_gb())
        skipped = _all_sum_counts(self.stream.pop_skipped(), self.device)
        self.skipped_total.update(skipped)
        for reason, n in skipped.items():
            metrics[metric_name(reason)] = n
        self.tracker.log_metrics(metrics, self.step)
        if self.figure_queue is not None:
            self._log_sink_files(self.figure_queue.finished())
        if self.rank == 0:
            terms = (f" (ce {reduced['grad_norm_ce']:.3g}, lambda*dec {reduced['grad_norm_dec']:.3g})"
                     if "grad_norm_ce" in reduced else "")
            log.info("step %d/%d loss %.4f ce %.4f dec %.4g lr %.2e gnorm %.3f%s %.1f samples/s", self.step,
                     self.cfg.train.max_steps, reduced["loss"], reduced["ce_loss"], reduced["dec_loss_raw"],
                     metrics["train/lr"], reduced["grad_norm"], terms, metrics["perf/samples_per_s"])
            line = skip_summary(skipped)
            if line:
                log.warning("data, all ranks, since the last log: %s; since this process started: %s",
                            line, skip_summary(self.skipped_total))

    # ---- periodic work -----------------------------------------------------------------------------
    def _probe_sinks(self) -> None:
        """All ranks run the probe forward (ZeRO-3 gathers weights in it); rank 0 logs and writes files."""
        from trainer.engine.probe import run_probe
        report, _ = run_probe(self.monitor, self.model, self.tokenizer, self.to_device(self.probe_batch), self.step,
                              out_dir=self.run_dir / "sinks", figure_queue=self.figure_queue)
        if self.rank == 0:
            self.tracker.log_metrics(report.to_metrics(), self.step)
            self._log_sink_files([(self.step, report.files)])

    def _log_sink_files(self, done: list[tuple[int, list[Path]]]) -> None:
        for step, files in done:
            for path in files:
                self.tracker.log_artifact(path, f"sinks/step_{step:07d}")

    def _check_eval_splits(self) -> None:
        """Fail at the start, not after training, when a split evaluated at the end has no index."""
        from trainer.data.shard_format import index_location, index_name
        from trainer.data.storage import exists, redact
        shard_dir = self.cfg.data.shard_dir
        missing = [s for s in final_eval_splits(self.cfg) if not exists(index_location(shard_dir, s))]
        if missing:
            raise FileNotFoundError(f"--train.final-eval-splits: no split {missing} in {redact(shard_dir)} "
                                    f"(no {index_name(missing[0])})")

    def _evaluate(self, split: str, max_samples: int | None, tag: str = "", num_beams: int | None = None) -> dict:
        from trainer.data.pipeline import build_eval_loader
        loader = build_eval_loader(self.cfg.data, self.model.input_streams, split, rank=self.rank,
                                   world_size=self.world_size)
        name = f"{split}_{tag}" if tag else f"{split}_step{self.step:08d}"
        result = evaluate_wer(
            self.model, loader, tokenizer=self.tokenizer, device=self.device, to_device=self.to_device,
            num_beams=num_beams or self.cfg.train.eval_beams, max_new_tokens=self.cfg.train.eval_max_new_tokens,
            synced_gpus=self.zero3 and self.world_size > 1, max_samples=max_samples, rank=self.rank,
            desc=f"{split} {tag or f'step {self.step}'}", report_path=self.run_dir / "eval" / f"{name}.json",
            stop_requested=self.stop.requested, loss=self.cfg.train.eval_loss)
        mod = self.cfg.model.modality
        self.tracker.log_metrics({f"{split}{'_' + tag if tag else ''}/{mod}/{k}": v for k, v in result.items()},
                                 self.step)
        if self.rank == 0:
            skipped = skip_summary({k.split("/", 1)[1]: int(v) for k, v in result.items()
                                    if k.startswith("skipped/")})
            log.info("%s%s %s WER %.2f%% CER %.2f%% on %d utterances; %s", split, f" ({tag})" if tag else "",
                     mod, 100 * result["wer"], 100 * result["cer"], int(result["num_utterances"]),
                     f"skipped: {skipped}" if skipped else "nothing skipped")
            report = self.run_dir / "eval" / f"{name}.json"
            if report.is_file():
                self.tracker.log_artifact(report, "eval")
        return result

    def _validation_loss(self) -> dict:
        """The teacher-forced loss per token on the validation split (no generation): one point of the
        validation curve, logged as val/loss_per_token and kept in eval/<split>_loss_step<N>.json. The
        run's last point is the final evaluation's own (with --train.eval-loss)."""
        from trainer.data.pipeline import build_eval_loader
        split = self.cfg.data.eval_split
        loader = build_eval_loader(self.cfg.data, self.model.input_streams, split, rank=self.rank,
                                   world_size=self.world_size)
        result = evaluate_loss(self.model, loader, tokenizer=self.tokenizer, device=self.device,
                               to_device=self.to_device, max_samples=self.cfg.train.eval_max_samples, rank=self.rank,
                               desc=f"{split} loss step {self.step}",
                               report_path=self.run_dir / "eval" / f"{split}_loss_step{self.step:08d}.json",
                               stop_requested=self.stop.requested)
        self.tracker.log_metrics({f"{split}/loss_per_token": result["loss_per_token"]}, self.step)
        if self.rank == 0:
            log.info("%s loss per token %.4f on %d utterances (step %d)", split, result["loss_per_token"],
                     int(result["num_utterances"]), self.step)
        return result

    def _save(self) -> None:
        self.ckpt.save(self.ds_engine, self.step, client_state={"step": self.step},
                       rank_state={"data": self.stream.state()},
                       trainer_state={"frozen_fingerprint": self.frozen_fingerprint,
                                      "world_size": self.world_size,
                                      "mlflow_run_id": getattr(self.tracker, "run_id", None)})
