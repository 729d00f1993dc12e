"""Where a training step's time goes: data wait, forward, backward, optimizer, and the ZeRO-3
collectives inside them, on the real trainer (`trainer.engine.trainer.Trainer`, DeepSpeed engine,
the demo's model and data unless told otherwise).

Launch it like training, with the same options after the script's own (everything it does not know
goes to the experiment config):

    torchrun --standalone --nproc_per_node 2 bench/profile_step.py --steps 30 --warmup 5
    torchrun --standalone --nproc_per_node 2 bench/profile_step.py --steps 30 -- --data.num-workers 1

Per step it times, on every rank, (1) waiting for the next batch, (2) the forward, (3) the backward,
(4) `engine.step()`, and prints the mean over the timed steps (max over ranks: the slowest rank sets
the pace). With --torch-profile K it also records K more steps with torch.profiler and sums the CPU
time of the collectives (all-gather, reduce-scatter, all-reduce, broadcast: what ZeRO-3 sends over
gloo on CPU) and the top operators, so the phases above can be split into compute and communication.
--csv appends one row of results. Timings on a shared machine move with its load: compare settings
back to back, or interleaved (--repeat).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # run from anywhere in the checkout

PHASES = ("data", "forward", "backward", "step")
COMM = ("allgather", "all_gather", "reduce_scatter", "reducescatter", "allreduce", "all_reduce",
        "broadcast", "barrier")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (loader start, first gathers)")
    p.add_argument("--torch-profile", type=int, default=0,
                   help="steps recorded with torch.profiler after the timed ones (0 = none)")
    p.add_argument("--label", default="", help="a name for this setting in the printout and the CSV")
    p.add_argument("--csv", help="append one row of results to this CSV file")
    p.add_argument("--keep", action="store_true", help="keep the scratch run folder")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.steps < 1 or args.warmup < 0 or args.torch_profile < 0:
        p.error("--steps must be >= 1, --warmup and --torch-profile >= 0")
    return args, rest


def children_cpu() -> float:
    """CPU seconds (user + system) used so far by this process's live child processes (the
    DataLoader workers): on a shared machine CPU time is a steadier measure of work than wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in kids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick      # utime, stime
    return total


def timed_step(trainer, clock) -> dict[str, float]:
    """Trainer._train_step's work, phase by phase: the batches and their global token counts (an
    all-reduce), then per micro-batch the forward, the backward and engine.step()."""
    from trainer.engine.loss import GlobalCounts, backward, micro_batch_share

    engine = trainer.ds_engine
    engine.train()
    t = dict.fromkeys(PHASES, 0.0)
    t0 = clock()
    batches = trainer.next_micro_batches()
    local = [trainer.model.token_counts(b) for b in batches]
    counts = GlobalCounts.all_reduced(local, trainer.device)
    t["data"] += clock() - t0
    loss_sum = 0.0
    for batch, expected in zip(batches, local):
        t0 = clock()
        batch = trainer.to_device(batch)
        out = engine(batch)
        loss, shares = micro_batch_share(out, counts, expected)
        t1 = clock()
        backward(engine, loss)
        t2 = clock()
        engine.step()
        t3 = clock()
        t["forward"] += t1 - t0
        t["backward"] += t2 - t1
        t["step"] += t3 - t2
        loss_sum += float(shares[0])     # LOGGED order: the loss first (a host read, after the timed phases)
    t["loss"] = loss_sum            # this rank's share of the step's loss
    return t


def comm_breakdown(prof) -> tuple[float, list[tuple[str, float, int]]]:
    """(seconds in collectives, top operators by self CPU time) from a torch.profiler run."""
    rows = []
    comm = 0.0
    for e in prof.key_averages():
        name = e.key
        secs = e.self_cpu_time_total / 1e6
        if any(c in name.lower() for c in COMM):
            comm += e.cpu_time_total / 1e6 if name.startswith("c10d::") or "gloo" in name.lower() else secs
        rows.append((name, secs, e.count))
    rows.sort(key=lambda r: -r[1])
    return comm, rows


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    import torch
    from trainer import distributed

    from data_tools.demo import ensure_demo_corpus
    from trainer.config import parse_args as parse_experiment
    from trainer.data.stream import TrainStream
    from trainer.engine.trainer import Trainer

    rank = int(os.environ.get("RANK", 0))
    # one scratch run folder for all ranks (they share the tokenizer it holds): named by the launcher's pid
    work = Path(tempfile.gettempdir()) / f"profile_step_{os.getppid()}"
    total = args.warmup + args.steps + args.torch_profile
    extra = ["--train.max-steps", str(total + 1), "--train.warmup-steps", str(min(40, total)),
             "--train.run-dir", str(work), "--tracking.enabled", "False",
             "--monitor.every", "0"]
    default_config = [] if "--config" in rest else ["--config", str(REPO / "ds_configs" / "zero3.json")]
    cfg = parse_experiment([*default_config, *extra, *rest])
    os.chdir(REPO)
    ensure_demo_corpus(cfg.data, rank)
    trainer = Trainer(cfg)
    try:
        trainer.stream = TrainStream(trainer._make_train_loader)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

        def clock() -> float:
            sync()
            return time.perf_counter()

        for _ in range(args.warmup):
            timed_step(trainer, clock)
        distributed.barrier()
        steps, losses = [], []
        t_start = clock()
        cpu0, kids0 = time.process_time(), children_cpu()
        for _ in range(args.steps):
            t0 = clock()
            phases = timed_step(trainer, clock)
            phases["total"] = clock() - t0
            losses.append(phases.pop("loss"))
            steps.append(phases)
        wall = clock() - t_start
        cpu = torch.tensor([(time.process_time() - cpu0) / args.steps, (children_cpu() - kids0) / args.steps],
                           dtype=torch.float64)
        distributed.all_reduce_(cpu)        # summed over ranks: the machine's CPU per optimizer step

        comm, top = None, []
        if args.torch_profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.torch_profile):
                    timed_step(trainer, clock)
            comm, top = comm_breakdown(prof)
            comm /= args.torch_profile

        keys = [*PHASES, "total"]
        mean = torch.tensor([statistics.mean(s[k] for s in steps) for k in keys], dtype=torch.float64)
        slowest = mean.clone()
        distributed.all_reduce_(slowest, op="max")
        threads = torch.get_num_threads()
        if rank == 0:
            world = distributed.world_size()
            title = f"{args.label + ': ' if args.label else ''}{world} process(es), {threads} torch thread(s) each, " \
                    f"data workers {cfg.data.num_workers}, {args.steps} steps after {args.warmup} warm-up"
            print(title)
            print(f"{'phase':<10} {'rank 0 (s)':>11} {'slowest rank':>13} {'share':>7}")
            for i, k in enumerate(keys):
                print(f"{k:<10} {mean[i]:>11.3f} {slowest[i]:>13.3f} {100 * mean[i] / mean[-1]:>6.1f}%")
            print(f"wall {wall:.1f} s for {args.steps} steps = {wall / args.steps:.3f} s/step; "
                  f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
            print(f"CPU per step, all ranks: trainer processes {cpu[0]:.3f} s, data workers {cpu[1]:.3f} s")
            if comm is not None:
                print(f"torch.profiler, {args.torch_profile} steps, rank 0: collectives {comm:.3f} s/step "
                      f"({100 * comm / mean[-1]:.0f}% of a step)")
                print(f"{'operator (self CPU)':<48} {'s/step':>8} {'calls/step':>10}")
                for name, secs, count in top[:15]:
                    print(f"{name[:48]:<48} {secs / args.torch_profile:>8.3f} {count / args.torch_profile:>10.1f}")
            if args.csv:
                row = {"label": args.label, "world": world, "threads": threads, "workers": cfg.data.num_workers,
                       "steps": args.steps, **{f"{k}_s": round(float(mean[i]), 4) for i, k in enumerate(keys)},
                       "s_per_step": round(wall / args.steps, 4), "cpu_train_s": round(float(cpu[0]), 4),
                       "cpu_workers_s": round(float(cpu[1]), 4),
                       "comm_s": "" if comm is None else round(comm, 4), "args": " ".join(rest)}
                new = not Path(args.csv).is_file()
                with open(args.csv, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
    finally:
        trainer.stream.close()      # its DataLoader workers ignore SIGTERM: left to exit, they hang it
        trainer.stop.uninstall()
        trainer.tracker.finish("FINISHED")
        distributed.barrier()
        if not args.keep and rank == 0:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
