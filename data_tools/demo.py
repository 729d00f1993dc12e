"""Build the synthetic demo corpus on first use, once, on rank 0 (other ranks wait for it).

Called by launch/train.py and the bench scripts before the trainer reads its data; the folder is the
library's default shard dir (trainer.data.config.DEMO_SHARD_DIR), which config checks let through
unbuilt.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from trainer.data.config import DEMO_SHARD_DIR
from trainer.data.shard_format import index_path
from trainer.data.storage import is_remote

from .synth import build_corpus

log = logging.getLogger(__name__)

DEMO_UTTERANCES = 600
DEMO_SEED = 0


def ensure_demo_corpus(data_cfg, rank: int, timeout_s: float = 1800) -> None:
    if is_remote(data_cfg.shard_dir):
        return   # a user's remote shard set: the loader reports what is missing
    folder = Path(data_cfg.shard_dir)
    splits = (data_cfg.train_split, data_cfg.eval_split, data_cfg.test_split)
    if all(index_path(folder, s).is_file() for s in splits):
        return
    if Path(data_cfg.shard_dir).resolve() != Path(DEMO_SHARD_DIR).resolve():
        return   # a user's shard set: the loader reports what is missing, with the fix
    if rank == 0:
        log.info("building the synthetic demo corpus (%d utterances) in %s", DEMO_UTTERANCES, folder)
        build_corpus(folder, num_utterances=DEMO_UTTERANCES, seed=DEMO_SEED)
    else:   # no process group yet: wait for the indexes, which are written last and atomically
        deadline = time.time() + timeout_s
        while not all(index_path(folder, s).is_file() for s in splits):
            if time.time() > deadline:
                raise TimeoutError(f"rank {rank}: demo corpus not built in {folder} after {timeout_s} s")
            time.sleep(2)
