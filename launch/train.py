"""Entry point: `deepspeed launch/train.py --config ds_configs/zero3.json [options]`.

With no other option it trains the embedded demo (tiny model, synthetic corpus, which
is built on first use). `--help` lists every option.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys


def main() -> int | None:
    from data_tools.demo import ensure_demo_corpus
    from trainer.config import ConfigError, parse_args
    from trainer.tracking.tracker import preflight
    from trainer.engine.checkpoint import SaveFailed, check_world_size
    from trainer.engine.trainer import Trainer

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = parse_args()        # options and inputs validated before any process group starts
    except ConfigError as err:
        if rank == 0:             # every rank finds the same problem: say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    # the launchers' WORLD_SIZE; srun starting the ranks itself sets only SLURM_NTASKS
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    problem = check_world_size(cfg.train.run_dir, cfg.train.resume, world)
    if problem:
        if rank == 0:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if rank == 0 and not preflight(cfg.tracking, cfg.train.run_dir):   # the store answers, in seconds
        cfg.tracking = dataclasses.replace(cfg.tracking, enabled=False)
    ensure_demo_corpus(cfg.data, rank)
    try:
        results = Trainer(cfg).train()
    except SaveFailed as err:     # every rank raises it (a full disk): one line, no traceback
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return _exit(1)
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


if __name__ == "__main__":
    sys.exit(main())
