"""The shard-reading path alone, from a local folder: index load + start-up check, and tar read +
sample grouping (no decoding), in CPU time (less sensitive to a loaded machine than wall time).

For before/after comparisons of changes to trainer/data (run it with each checkout first on the path):

  PYTHONPATH=/path/to/old/checkout python bench/bench_shard_read.py --shard-dir SHARDS --split bench
  PYTHONPATH=. python bench/bench_shard_read.py --shard-dir SHARDS --split bench
"""
from __future__ import annotations

import argparse
import time

from trainer.data import DataConfig
from trainer.data.pipeline import checked_index, shard_samples
from trainer.data.skips import SkipCounter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-dir", required=True, help="folder with shards and {split}.index.json")
    p.add_argument("--split", default="train", help="split to read")
    p.add_argument("--rounds", type=int, default=15, help="passes over the split (median and min reported)")
    args = p.parse_args()
    cfg = DataConfig(shard_dir=args.shard_dir, train_split=f"-{args.split}", eval_split=args.split,
                     test_split=f"--{args.split}")
    t0 = time.process_time()
    for _ in range(200):
        index = checked_index(cfg, args.split)
    t_index = (time.process_time() - t0) / 200
    shards = [(url, info.samples) for url, info in zip(index.urls, index.shards)]
    times, n = [], 0
    for _ in range(args.rounds):
        t0 = time.process_time()
        n = sum(1 for _ in shard_samples(iter(shards), SkipCounter()))
        times.append(time.process_time() - t0)
    times.sort()
    print(f"index load + shard check: {t_index * 1e3:.3f} ms; read {len(shards)} shards ({n} samples): "
          f"median {times[len(times) // 2] * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms CPU")


if __name__ == "__main__":
    main()
