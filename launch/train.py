"""Entry point: `deepspeed launch/train.py --config ds_configs/zero3.json [options]`.

With no other option it trains the embedded demo (tiny model, synthetic corpus, which
is built on first use). `--help` lists every option.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path


def main() -> int | None:
    from trainer.config import ConfigError, parse_args     # light: a mistaken input costs no torch import
    from trainer.device import DeviceError, settle_device

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_args()        # options and inputs validated before any process group starts
        settle_device(cfg.train.device)     # before deepspeed is imported: it reads DS_ACCELERATOR once
    except (ConfigError, DeviceError) as err:
        if rank == 0:             # every rank finds the same problem: say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    from trainer.distributed import one_process_without_launcher
    if one_process_without_launcher():       # `python launch/train.py`: one process, as torchrun would set it
        logging.getLogger("trainer").info("no launcher: one process (deepspeed or torchrun start several)")
    from data_tools.demo import ensure_demo_corpus
    from trainer.engine.checkpoint import SaveFailed, check_world_size
    from trainer.engine.trainer import Trainer
    from trainer.tracking.tracker import preflight

    # the launchers' WORLD_SIZE; srun starting the ranks itself sets only SLURM_NTASKS
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    problem = check_world_size(cfg.train.run_dir, cfg.train.resume, world)
    if problem:
        if rank == 0:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        log_path = _log_to_run_folder(cfg.train.run_dir, rank)
    except OSError as err:       # a folder the checks could not foresee (/proc, a full disk)
        print(f"error: --train.run-dir {cfg.train.run_dir}: cannot be written ({err.strerror})", file=sys.stderr)
        return 2
    try:
        if rank == 0 and not preflight(cfg.tracking, cfg.train.run_dir):   # the store answers, in seconds
            cfg.tracking = dataclasses.replace(cfg.tracking, enabled=False)
        ensure_demo_corpus(cfg.data, rank)
        results = Trainer(cfg).train()
    except SaveFailed as err:     # every rank raises it (a full disk): one line, no traceback
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return _exit(1)
    except Exception:            # an internal error: its traceback, on the console and kept in the run folder
        logging.getLogger("trainer").exception("rank %d failed", rank)
        print(f"internal error on rank {rank}: traceback above and in {log_path}", file=sys.stderr, flush=True)
        return 1
    if rank == 0:
        logging.getLogger("trainer").info("done: %s", results)
    # Everything is written (checkpoint, MLflow status, results): skip the interpreter's teardown,
    # whose final garbage collection alone took 10-20 s here, out of the 30 s SLURM allows between
    # its SIGTERM and SIGKILL for the checkpoint *and* the exit.
    return _exit(0)


def _exit(code: int):
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _log_to_run_folder(run_dir: str, rank: int) -> Path:
    """Each rank's log also goes to RUN/logs/rank<N>.log (appended across restarts), so an internal error's
    traceback stays with the run. Only after the checks passed: a mistaken input writes nothing."""
    path = Path(run_dir) / "logs" / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.getLogger().handlers[0].formatter)
    logging.getLogger().addHandler(handler)
    return path


if __name__ == "__main__":
    sys.exit(main())
