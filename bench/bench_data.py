"""Throughput of the data path: tar read -> mp4/wav decode -> crop/normalise -> log-mel -> batch.

Reports clips per second (wall), clips per second per CPU core used, and audio seconds decoded
per CPU second (a real-time factor: 100 means one core prepares 100 s of audio-visual speech per
second). CPU time counts the main process and its DataLoader workers (reaped children).
Without --shard-dir, it first writes a tone corpus (data_tools/tones.py: H.264 mouth clips + WAV) to a
temp dir.

  PYTHONPATH=. python bench/bench_data.py --workers 0,1,2 --csv bench_data.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere in the checkout

from data_tools.tones import build_tone_corpus  # noqa: E402
from trainer.data import DataConfig, build_eval_loader, build_train_loader  # noqa: E402
from trainer.data.shard_format import FPS, load_index  # noqa: E402
from trainer.model.config import MODALITIES, ModelConfig  # noqa: E402


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(cfg: DataConfig, modality: str, mode: str, split: str, repeat: int) -> dict:
    streams = ModelConfig(modality=modality).streams()     # what the tiny model of that modality reads
    clips = frames = batches = 0
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(repeat if mode == "eval" else 1):
        loader = (build_eval_loader(cfg, streams, split, 0, 1) if mode == "eval"
                  else build_train_loader(cfg, streams, 0, 1, epoch=0))
        for b in loader:
            clips += len(b["keys"])
            frames += int(b["frames"].sum())
            batches += 1
        del loader                     # workers are joined here, so their CPU time is counted
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    cores = min(max(1, cfg.num_workers), os.cpu_count() or 1)
    audio_s = frames / FPS
    return {"mode": mode, "modality": modality, "workers": cfg.num_workers, "clips": clips,
            "batches": batches, "audio_s": round(audio_s, 2), "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "clips_per_s": round(clips / wall, 2), "clips_per_s_per_core": round(clips / wall / cores, 2),
            "audio_s_per_cpu_s": round(audio_s / cpu, 2) if cpu > 0 else float("nan")}


def build_fixture(folder: Path, shards: int, per_shard: int, min_frames: int, max_frames: int) -> None:
    t0 = time.perf_counter()
    build_tone_corpus(folder, {"bench": (shards, per_shard)}, min_frames=min_frames, max_frames=max_frames)
    print(f"# wrote {shards} x {per_shard} fixture clips ({min_frames}-{max_frames} frames) to {folder} "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-dir",
                   help="folder with shards and {split}.index.json; default: build fixture shards")
    p.add_argument("--split", default=None,
                   help="split to read (default: 'bench' for fixtures, else 'train')")
    p.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts to measure")
    p.add_argument("--modes", default="eval,train",
                   help="eval (single ordered pass) and/or train (shuffle + augment)")
    p.add_argument("--modality", default="avsr", choices=MODALITIES,
                   help="which streams to decode")
    p.add_argument("--noise", default="none", choices=["none", "white", "babble"], help="training noise")
    p.add_argument("--repeat", type=int, default=2, help="eval: passes over the split per measurement")
    p.add_argument("--train-clips", type=int, default=300,
                   help="train: clips in the measured epoch (long enough that buffer warm-up "
                        "does not dominate)")
    p.add_argument("--max-frames-per-batch", type=int, default=1500,
                   help="padded video-frame budget per batch")
    p.add_argument("--fixture-shards", type=int, default=4, help="fixture: number of shards")
    p.add_argument("--fixture-clips", type=int, default=12, help="fixture: clips per shard")
    p.add_argument("--fixture-frames", default="50,150", help="fixture: min,max frames per clip (25 fps)")
    p.add_argument("--csv", help="append the rows to this CSV file")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process (workers use 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = None
    if args.shard_dir:
        folder, split = Path(args.shard_dir), args.split or "train"
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        folder, split = Path(tmp.name), args.split or "bench"
        lo, hi = (int(x) for x in args.fixture_frames.split(","))
        build_fixture(folder, args.fixture_shards, args.fixture_clips, lo, hi)
    index = load_index(folder, split)

    rows = []
    for mode in args.modes.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            # only the measured split is read; the other split names just have to differ
            cfg = DataConfig(shard_dir=str(folder), train_split=split if mode == "train" else "-",
                             eval_split=split if mode == "eval" else "--", test_split="---",
                             noise=args.noise, num_workers=workers,
                             max_frames_per_batch=args.max_frames_per_batch,
                             samples_per_epoch=args.train_clips,
                             max_clip_frames=min(600, args.max_frames_per_batch))
            if mode == "eval" and workers > len(index.shards):
                print(f"# skip eval with {workers} workers: only {len(index.shards)} shards", file=sys.stderr)
                continue
            rows.append(run_once(cfg, args.modality, mode, split, args.repeat))
            print(f"# {rows[-1]}", file=sys.stderr)

    cols = ["mode", "modality", "workers", "clips", "audio_s", "wall_s", "cpu_s", "clips_per_s",
            "clips_per_s_per_core", "audio_s_per_cpu_s"]
    print(f"cpu cores: {os.cpu_count()}  torch {torch.__version__}  python {platform.python_version()}  "
          f"shards: {folder} ({split}, {index.num_samples} clips, {index.duration:.0f} s)")
    print(" ".join(f"{c:>20}" for c in cols))
    for r in rows:
        print(" ".join(f"{str(r[c]):>20}" for c in cols))
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols + ["batches", "host_cpus", "torch"])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**r, "host_cpus": os.cpu_count(), "torch": torch.__version__})
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
