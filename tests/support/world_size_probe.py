"""Run under torchrun by tests/e2e/test_world_size_resume.py: `world_size_probe.py --dump DIR -- <train args>`.

Builds the real Trainer from the train arguments, resumes (a checkpoint written by another world
size), and before any step writes what it loaded, gathered again on this world size, to
DIR/portable/ with the trainer's own portable writer; then trains on to the end like launch/train.py.
The test compares DIR's state with the checkpoint's: they must be equal, bit for bit.
"""
import logging
import os
import sys
from pathlib import Path

from trainer.config import parse_args
from trainer.engine import portable
from trainer.engine.trainer import Trainer


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    dump, train_args = Path(args[args.index("--dump") + 1]), args[split + 1:]
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    trainer = Trainer(parse_args(train_args))
    trainer._resume_or_start()
    portable.save(trainer.ds_engine, dump, trainer.rank, trainer.stream.state())
    trainer.stream.close()
    trainer.train()                 # resumes the same checkpoint again and trains to the end
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
