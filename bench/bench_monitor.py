"""Overhead of the attention-sink / massive-activation monitor on training (goal: < 3% at the default N).

Drives the real training step of `trainer.engine.trainer.Trainer` (DeepSpeed engine, ZeRO-3 by
default, one process; forward + backward + optimizer step on the demo's tiny Llama-AVSR and
data) and its real probe (`Trainer._probe_sinks`: eager-attention probe forward, analysis,
report.json, PNG figures, MLflow metrics and artefacts). Measured:

  (a) the mean optimizer-step time over --steps steps, monitoring off;
  (b) the mean cost of one probe over --probes probes (after a first, warm-up probe whose
      one-off cost is reported separately), also split into forward + analysis only;
  -> overhead at every=N is probe / (N x step): at the default N = MonitorConfig.every, which
     would need hundreds of steps to measure directly;
  (c) to check that formula: the same step loop as Trainer.train over --check-steps steps with
      monitoring off and with every=--check-every (same batches in both), measured directly.

  python bench/bench_monitor.py                       # CPU (or the GPU when there is one)
  python bench/bench_monitor.py --device cpu --steps 20 --probes 3 --check-every 10 --check-steps 40
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from anywhere in the checkout


def parse_args() -> argparse.Namespace:
    from trainer.monitor.config import MonitorConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu")
    p.add_argument("--every", type=int, default=MonitorConfig.every,
                   help=f"N the overhead is reported for (default: MonitorConfig.every = "
                        f"{MonitorConfig.every})")
    p.add_argument("--steps", type=int, default=20, help="timed training steps for the mean step time")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--probes", type=int, default=3, help="timed probes (after one warm-up probe)")
    p.add_argument("--check-every", type=int, default=10, help="N of the direct measurement (0 = skip it)")
    p.add_argument("--check-steps", type=int, default=40, help="steps of each direct run (off, on)")
    p.add_argument("--shards", default=str(REPO / "data" / "synth"),
                   help="shard folder (default: the demo corpus, built there if missing)")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3.json"), help="DeepSpeed JSON")
    p.add_argument("--max-frames-per-batch", type=int, default=None,
                   help="data.max_frames_per_batch (default: the demo's)")
    p.add_argument("--probe-batch-size", type=int, default=MonitorConfig.probe_batch_size,
                   help="monitor.probe_batch_size")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers")
    p.add_argument("--csv", help="append one row of results to this CSV file")
    p.add_argument("--keep", action="store_true", help="keep the scratch run folder (reports, MLflow store)")
    args = p.parse_args()
    if args.every < 1 or args.steps < 1 or args.probes < 1:
        p.error("--every, --steps and --probes must be >= 1")
    for name in ("shards", "ds_config", "csv"):          # the bench runs in a scratch folder
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(device: str) -> None:
    """What a launcher would set, for a one-process DeepSpeed run; the accelerator before deepspeed loads."""
    os.environ["DS_ACCELERATOR"] = device
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_RUN_ID", None)


class Bench:
    def __init__(self, trainer):
        import torch

        self.t = trainer
        self.cuda = trainer.device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def restart_stream(self) -> None:
        """Data from the start of epoch 0, so two timed phases see the same batches."""
        from trainer.data.stream import TrainStream

        if self.t.stream is not None:
            self.t.stream.close()          # its workers ignore SIGTERM: end them, or the bench hangs at exit
        self.t.stream = TrainStream(self.t._make_train_loader)

    def step(self) -> float:
        from trainer.engine.throughput import ThroughputMeter

        self.sync()
        t0 = time.perf_counter()
        self.t._train_step(ThroughputMeter(1))
        self.sync()
        return time.perf_counter() - t0

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def probe_forward_only(self) -> None:
        from trainer.engine.probe import run_probe

        t = self.t
        run_probe(t.monitor, t.model, t.tokenizer, t.to_device(t.probe_batch), t.step, out_dir=None)

    def loop(self, steps: int, monitor_every: int) -> tuple[float, float]:
        """Trainer.train's loop without logging, evaluation and checkpoints.
        -> (seconds in training steps, seconds in probes), each divided by `steps`."""
        self.restart_stream()
        self.t.monitor.cfg.every = monitor_every
        in_steps = in_probes = 0.0
        for i in range(1, steps + 1):
            in_steps += self.step()
            if monitor_every and self.t.monitor.should_run(i):
                self.t.step = i
                in_probes += self.timed(self.t._probe_sinks)
        return in_steps / steps, in_probes / steps


def main() -> None:
    args = parse_args()
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    single_process_env(device)
    work = Path(tempfile.mkdtemp(prefix="bench_monitor_"))

    from data_tools.demo import ensure_demo_corpus
    from trainer.config import ExperimentConfig
    from trainer.data.config import DEMO_SHARD_DIR, DataConfig
    from trainer.engine.config import TrainConfig
    from trainer.tracking.config import TrackingConfig
    from trainer.engine.trainer import Trainer
    from trainer.monitor.config import MonitorConfig

    data = DataConfig(shard_dir=args.shards, num_workers=args.num_workers)
    if args.max_frames_per_batch:
        data = dataclasses.replace(data, max_frames_per_batch=args.max_frames_per_batch,
                                   max_clip_frames=min(data.max_clip_frames, args.max_frames_per_batch))
    total_steps = args.warmup + args.steps + 2 * args.check_steps + args.probes + 1
    cfg = ExperimentConfig(
        config=args.ds_config, data=data,
        train=TrainConfig(run_dir=str(work / "run"), max_steps=total_steps, warmup_steps=1, device=device),
        monitor=MonitorConfig(every=args.every, probe_batch_size=args.probe_batch_size),
        tracking=TrackingConfig(experiment="bench_monitor"))
    if Path(args.shards) == REPO / DEMO_SHARD_DIR:     # the demo corpus, built when missing
        os.chdir(REPO)
        ensure_demo_corpus(dataclasses.replace(cfg.data, shard_dir=DEMO_SHARD_DIR), rank=0)
    os.chdir(work)                          # MLflow's default artefact folder lands here, not in the repo

    trainer = Trainer(cfg)
    status = "FAILED"
    try:
        bench = Bench(trainer)
        trainer._setup_monitor()                    # the fixed probe batch (a one-off at the start of a run)
        bench.restart_stream()
        for _ in range(args.warmup):
            bench.step()
        steps = [bench.step() for _ in range(args.steps)]
        step_mean, step_sd = statistics.mean(steps), statistics.stdev(steps) if len(steps) > 1 else 0.0

        trainer.step = 1
        first_probe = bench.timed(trainer._probe_sinks)
        fwd = [bench.timed(bench.probe_forward_only) for _ in range(args.probes)]
        full = []
        for k in range(args.probes):
            trainer.step = 2 + k                    # a fresh step_XXXXXXX folder per probe, as in training
            full.append(bench.timed(trainer._probe_sinks))
        probe_mean, fwd_mean = statistics.mean(full), statistics.mean(fwd)

        check = None
        if args.check_every:
            off, _ = bench.loop(args.check_steps, 0)
            on_steps, on_probes = bench.loop(args.check_steps, args.check_every)
            check = (off, on_steps, on_probes)
        status = "FINISHED"
    finally:
        if trainer.stream is not None:
            trainer.stream.close()
        trainer.stop.uninstall()
        trainer.tracker.finish(status)
        os.chdir(REPO)
        if args.keep or status != "FINISHED":
            print(f"# scratch run folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    n = args.every
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")
    rows = [
        ("device", f"{device} ({name}, {torch.get_num_threads()} threads)"),
        ("model / data", f"tiny Llama-AVSR ({cfg.model.modality}), {Path(args.ds_config).name}, 1 process, "
                         f"max_frames_per_batch {cfg.data.max_frames_per_batch}, "
                         f"probe rows {args.probe_batch_size}"),
        (f"mean train step ({args.steps} steps)", f"{step_mean * 1e3:.1f} ms (sd {step_sd * 1e3:.1f})"),
        ("first probe (one-off warm-up)", f"{first_probe * 1e3:.1f} ms"),
        (f"probe: forward + analysis ({args.probes})", f"{fwd_mean * 1e3:.1f} ms"),
        (f"probe as in training ({args.probes})",
         f"{probe_mean * 1e3:.1f} ms (+ report.json, figures, MLflow)"),
        (f"overhead at every={n}", f"{100 * probe_mean / (n * step_mean):.2f} %  (probe / (N x step))"),
        (f"  forward + analysis only, every={n}", f"{100 * fwd_mean / (n * step_mean):.2f} %"),
    ]
    if check:
        off, on_steps, on_probes = check
        on, c = on_steps + on_probes, args.check_every
        rows += [
            (f"predicted at every={c}", f"{100 * probe_mean / (c * off):.1f} %  (probe / (N x step off))"),
            (f"measured at every={c} ({args.check_steps} steps)",
             f"{100 * (on - off) / off:.1f} %  (mean step {off * 1e3:.1f} ms off, {on * 1e3:.1f} ms on = "
             f"{on_steps * 1e3:.1f} training + {on_probes * 1e3:.1f} probes)"),
            ("  probe cost inside that loop",
             f"{on_probes * args.check_steps / max(args.check_steps // c, 1) * 1e3:.1f} ms per probe "
             f"(vs {probe_mean * 1e3:.1f} ms above)"),
        ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measurement':<{width}}  value")
    print("-" * (width + 60))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

    if args.csv:
        out = Path(args.csv)
        record = {"device": device, "every": n, "steps": args.steps, "probes": args.probes,
                  "step_ms": round(step_mean * 1e3, 2), "probe_ms": round(probe_mean * 1e3, 2),
                  "probe_fwd_ms": round(fwd_mean * 1e3, 2), "first_probe_ms": round(first_probe * 1e3, 2),
                  "overhead_pct": round(100 * probe_mean / (n * step_mean), 3),
                  "check_every": args.check_every,
                  "check_measured_pct": round(100 * (sum(check[1:]) - check[0]) / check[0], 2) if check
                  else "",
                  "torch": torch.__version__}
        new = not out.is_file()
        with open(out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(record))
            if new:
                w.writeheader()
            w.writerow(record)


if __name__ == "__main__":
    main()
