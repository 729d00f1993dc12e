"""Build the synthetic demo corpus on first use, once, on rank 0 (other ranks wait for it)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from trainer.data.index import index_path
from trainer.data.storage import is_remote

log = logging.getLogger(__name__)

DEMO_SHARD_DIR = "data/synth"
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
        from data_tools.synth import build_corpus
        log.info("building the synthetic demo corpus (%d utterances) in %s", DEMO_UTTERANCES, folder)
        build_corpus(folder, num_utterances=DEMO_UTTERANCES, seed=DEMO_SEED)
    else:   # no process group yet: wait for the indexes, which are written last and atomically
        deadline = time.time() + timeout_s
        while not all(index_path(folder, s).is_file() for s in splits):
            if time.time() > deadline:
                raise TimeoutError(f"rank {rank}: demo corpus not built in {folder} after {timeout_s} s")
            time.sleep(2)
