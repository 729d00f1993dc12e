"""Run under torchrun by tests/trainer/data/test_pipeline.py: each rank reads its eval share with real
DataLoader workers; rank 0 writes every rank's keys (gathered over gloo) to --out as JSON."""
import argparse
import json
import os

import torch.distributed as dist

from trainer.data import DataConfig, build_eval_loader
from trainer.model.config import ModelConfig

STREAMS = ModelConfig().streams()          # what the default (tiny, avsr) model reads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shard-dir", required=True, help="folder with the shards and their index")
    p.add_argument("--split", default="val", help="split to read")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--out", required=True, help="JSON file for the gathered keys (written by rank 0)")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert rank == int(os.environ["RANK"])
    cfg = DataConfig(shard_dir=args.shard_dir, num_workers=args.workers, max_frames_per_batch=120,
                     max_clip_frames=100)
    keys = [k for b in build_eval_loader(cfg, STREAMS, args.split, rank, world) for k in b["keys"]]
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
