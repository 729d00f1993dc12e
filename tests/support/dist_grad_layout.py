"""Run under torchrun (2 processes) by tests/trainer/engine/test_loss_layouts.py.

For each layout (a list per rank of micro-batches, each a list of clip indices), build the real
Trainer (tiny model, ZeRO-3, SGD without clipping, fresh run folder), feed it exactly those
micro-batches and take one optimizer step with Trainer._train_step. Rank 0 writes, per layout, the
trainable weights before and after the step (gathered by the trainer's own export) and the step's
logged values to --out/<layout index>/.
"""
import argparse
import json
from itertools import islice
from pathlib import Path

import numpy as np

from trainer.config import parse_args
from trainer.data.batching import collate
from trainer.data.decode import decode_stream
from trainer.data.shard_format import load_index
from trainer.data.pipeline import shard_samples
from trainer.data.skips import SkipCounter
from trainer.engine.export import export_trainable
from trainer.engine.throughput import ThroughputMeter
from trainer.engine.trainer import Trainer


def clips(cfg, streams, split: str, n: int):
    """The first n clips of a split, decoded as for evaluation (centre crop, no noise): deterministic."""
    index = load_index(cfg.shard_dir, split)
    counter = SkipCounter()
    shards = iter([(url, info.samples) for url, info in zip(index.urls, index.shards)])
    rng = np.random.default_rng(0)
    return list(islice(decode_stream(shard_samples(shards, counter), cfg, streams, counter, train=False, rng=rng,
                                     noise_rng=rng), n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layouts", required=True, help="JSON: [layout][rank][micro-batch] -> clip indices")
    p.add_argument("--out", required=True)
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, help="launch/train.py options after --")
    args = p.parse_args()
    layouts = json.loads(args.layouts)
    for i, layout in enumerate(layouts):
        out = Path(args.out) / str(i)
        extra = [a for a in args.trainer_args if a != "--"]
        cfg = parse_args([*extra, "--train.run-dir", str(out / "run"), "--train.grad-accum",
                          str(len(layout[0]))])
        trainer = Trainer(cfg)
        assert trainer.world_size == len(layout), (trainer.world_size, len(layout))
        pool = clips(cfg.data, trainer.model.input_streams, cfg.data.train_split,
                     1 + max(j for rank in layout for mb in rank for j in mb))
        trainer.stream = iter([collate([pool[j] for j in mb], {}) for mb in layout[trainer.rank]])
        export_trainable(trainer.model, out / "before", trainer.rank)
        stats = trainer._train_step(ThroughputMeter(trainer.world_size))
        values = trainer.step_values(stats)
        export_trainable(trainer.model, out / "after", trainer.rank)
        if trainer.rank == 0:
            (out / "values.json").write_text(json.dumps(values))
        trainer.stop.uninstall()


if __name__ == "__main__":
    main()
