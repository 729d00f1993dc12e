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
    from trainer.config import ConfigError, parse_args
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
    from data_tools.demo import ensure_demo_corpus
    from trainer.engine.trainer import Trainer
    from trainer.tracking.tracker import preflight

    if rank == 0 and not preflight(cfg.tracking, cfg.train.run_dir):   # the store answers, in seconds
        cfg.tracking = dataclasses.replace(cfg.tracking, enabled=False)
    ensure_demo_corpus(cfg.data, rank)
    results = Trainer(cfg).train()
    if rank == 0:
        logging.getLogger("trainer").info("done: %s", results)
    # Everything is written (checkpoint, MLflow status, results): skip the interpreter's teardown,
    # whose final garbage collection alone took 10-20 s here, out of the 30 s SLURM allows between
    # its SIGTERM and SIGKILL for the checkpoint *and* the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
