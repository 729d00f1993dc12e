"""Train and eval DataLoaders over WebDataset shards.

Every stage runs inside the DataLoader worker that owns it:
  shard urls -> wds.tarfile_samples (corrupt tars counted, not raised) -> [train: shuffle
  buffer] -> decode (bad samples counted) -> frame-budget batches -> collate (+ skip counts).

Train: an endless stream of shards (random permutations, one after another) seeded by
(seed, rank, worker, epoch); each rank yields exactly `train_batches_per_epoch(...)` batches,
the same number on every rank, so ZeRO-3 ranks step together. Resampling makes epochs
statistically, not exactly, equivalent to passes over the data (webdataset cannot resume
mid-shard); build a new loader per epoch with the epoch number.
Eval: one deterministic pass; shard i goes to rank i % world_size, and within a rank to
worker j % num_workers: every sample is seen exactly once across ranks x workers, in a
stable order. Ranks may get different numbers of batches: a trainer under ZeRO-3 must keep
ranks in lockstep itself (e.g. all-reduce a "has a batch" flag and run a dummy batch).
rank and world_size are passed explicitly; torch.distributed globals are never read.
"""
from __future__ import annotations

import logging
import math
import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.helper_signals import ignore_stop_signals, stop_signals_blocked

from . import skips as R
from . import storage
from .cache import ShardCache
from .batching import budget_batches, collate_stream
from .config import DataConfig, Streams
from .decode import decode_stream
from .shard_format import ShardIndex, load_index
from .skips import SkipCounter, UnusableDataError

log = logging.getLogger(__name__)

BATCH_SIZE_SLACK = 1.1   # padding allowance when estimating clips per batch from the mean length


def stream_seed(seed: int, rank: int, worker: int, epoch: int, train: bool = True) -> int:
    """One independent 63-bit seed per (seed, rank, worker, epoch) via numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, rank, worker, epoch, int(train)]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _worker_init(_: int) -> None:
    ignore_stop_signals()        # SIGTERM/SIGUSR1 are the trainer's to handle (trainer/helper_signals.py)
    torch.set_num_threads(1)     # parallelism comes from the workers; avoid oversubscription


def counting_handler(counter: SkipCounter):
    """A webdataset exception handler that counts the error and continues (warn_and_continue, but counted)."""
    def handler(exn: Exception) -> bool:
        counter.skip(R.TAR_ERROR, repr(exn))
        return True
    return handler


def _remote_tar_samples(url: str, handler, opener: "RemoteOpener", counter: SkipCounter) -> Iterator[dict]:
    """wds.tarfile_samples over a resuming remote stream (the same expander and key grouping)."""
    def opened():
        try:
            stream = opener.open(url, counter.retried)
        except Exception as exn:      # unreachable after retries: counted like a corrupt shard
            exn.args = exn.args + (storage.redact(url),)
            handler(exn)
            return
        try:
            yield {"url": storage.redact(url), "stream": stream}
        finally:
            stream.close()
    files = wds.tariterators.tar_file_expander(opened(), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


@dataclass(frozen=True)
class RemoteOpener:
    """How a worker opens remote shards: the retry policy and the optional local cache (picklable)."""
    policy: storage.RetryPolicy
    cache_dir: str = ""
    cache_max_bytes: int = 0
    cache_tag: str = ""          # the index digest: a rewritten split never reads stale cached shards

    @classmethod
    def for_index(cls, cfg: DataConfig, index: ShardIndex) -> "RemoteOpener | None":
        if not index.remote:
            return None
        return cls(cfg.retry_policy, cfg.cache_dir, int(cfg.cache_max_gb * 1e9), index.digest)

    def open(self, url: str, on_retry):
        cache = ShardCache(self.cache_dir, self.cache_max_bytes, self.cache_tag) if self.cache_dir else None
        return storage.open_stream(url, self.policy, on_retry, cache)


def shard_samples(shards: Iterator[tuple[str, int]], counter: SkipCounter,
                  num_shards: int | None = None, opener: RemoteOpener | None = None) -> Iterator[dict]:
    """Raw samples, one shard at a time, checked against the index's per-shard count.

    Each shard gets its own wds.tarfile_samples, so a sample cut by a corrupt shard never merges
    with the next shard's first sample. Read errors are counted by the handler (TAR_ERROR);
    samples the index promises but the tar does not deliver (a short read, or a corrupt header,
    on which tarfile stops silently) are counted as SHARD_SHORT. `num_shards` (the endless training
    stream): raise UnusableDataError once that many shards in a row delivered nothing, i.e. a
    whole pass over the shard set, instead of looping forever. `opener`: the shards are remote
    (streamed, retried, counted as retried/<reason>); None for local files.
    """
    handler = counting_handler(counter)
    empty_run = 0
    for url, expected in shards:
        n = 0
        samples = (wds.tarfile_samples(iter([{"url": url}]), handler=handler) if opener is None
                   else _remote_tar_samples(url, handler, opener, counter))
        for sample in samples:
            n += 1
            yield sample
        if n < expected:
            counter.skip(R.SHARD_SHORT, f"{storage.redact(url)}: {n} of {expected} samples", n=expected - n)
        empty_run = 0 if n else empty_run + 1
        if num_shards and empty_run >= num_shards:
            raise UnusableDataError(f"none of the {num_shards} shards delivered a sample "
                                    f"(e.g. {storage.redact(url)}; by reason: {dict(counter.skipped_only())}): "
                                    f"not WebDataset tars?")


def endless_shards(shards: list[tuple[str, int]], rng: random.Random, shuffle: bool,
                   offset: int) -> Iterator[tuple[str, int]]:
    """Shards as consecutive random permutations (every shard once per pass), or a rotated cycle."""
    order = list(shards)
    if not shuffle:
        order = order[offset % len(order):] + order[:offset % len(order)]
    while True:
        if shuffle:
            rng.shuffle(order)
        yield from order


class AVSRStream(IterableDataset):
    """Batches of decoded clips (schema in batching.py); see the module docstring."""

    def __init__(self, cfg: DataConfig, streams: Streams, shards: list[tuple[str, int]], *, train: bool, rank: int,
                 world_size: int, epoch: int = 0, batches: int = 0, split_by_sample: bool = False,
                 opener: RemoteOpener | None = None):
        super().__init__()
        self.opener = opener
        self.cfg, self.streams, self.shards, self.train = cfg, streams, list(shards), train
        self.rank, self.world_size, self.epoch, self.batches = rank, world_size, epoch, batches
        self.split_by_sample = split_by_sample

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("an eval stream has no fixed number of batches")
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        worker, num_workers = _worker()
        seed = stream_seed(cfg.seed, self.rank, worker, self.epoch, self.train)
        counter = SkipCounter(max_initial_failures=cfg.max_initial_failures)
        # independent generators: enabling noise must not change crops or batch order
        aug_rng, noise_rng, batch_rng = (np.random.default_rng(s)
                                         for s in np.random.SeedSequence(seed).spawn(3))
        if self.train:
            shards = endless_shards(self.shards, random.Random(seed), cfg.shuffle_shards,
                                    self.rank * num_workers + worker)
        elif self.split_by_sample:   # every rank reads every shard and keeps its own keys
            shards = iter(self.shards[worker::num_workers])
        else:
            shards = iter(self.shards[self.rank::self.world_size][worker::num_workers])
        samples = shard_samples(shards, counter, num_shards=len(self.shards) if self.train else None,
                                opener=self.opener)
        if not self.train and self.split_by_sample:
            samples = (s for s in samples if key_rank(s.get("__key__", ""), self.world_size) == self.rank)
        if self.train and cfg.shuffle_buffer > 1:
            shuffle = wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_buffer, rng=random.Random(seed + 1))
            samples = shuffle(samples)
        clips = decode_stream(samples, cfg, self.streams, counter, train=self.train, rng=aug_rng, noise_rng=noise_rng)
        batches = budget_batches(clips, *batch_budget(cfg, self.train),
                                 cfg.sort_buffer if self.train else 0, batch_rng if self.train else None)
        out = collate_stream(batches, counter)
        if self.train:   # this worker's share of the rank's batches; shares differ by at most one
            share = self.batches // num_workers + (1 if worker < self.batches % num_workers else 0)
            out = islice(out, share)
        yield from out


def _shard_list(index: ShardIndex) -> list[tuple[str, int]]:
    return [(url, info.samples) for url, info in zip(index.urls, index.shards)]


def checked_index(cfg: DataConfig, split: str) -> ShardIndex:
    """The split's index, refused with one clear error when it lists no samples or shards are missing."""
    if not cfg.shard_dir:
        raise ValueError("DataConfig.shard_dir is not set: point it at the folder with the shards and "
                         "their *.index.json")
    index = load_index(cfg.shard_dir, split, cfg.retry_policy)
    if not index.shards or index.num_samples == 0:
        raise UnusableDataError(f"shard index for split {split!r} in {storage.redact(cfg.shard_dir)} "
                                f"lists no samples")
    if index.remote:
        missing = _missing_remote(index, cfg.retry_policy)
    else:
        missing = [u for u in index.urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(index.urls)} shards listed in the {split!r} index "
                                f"are missing, e.g. {[storage.redact(u) for u in missing[:3]]}")
    return index


def _missing_remote(index: ShardIndex, policy: storage.RetryPolicy) -> list[str]:
    """Shards the index lists that the store does not hold: one listing on S3, a HEAD each over HTTP
    (in parallel), nothing for pipe: (a command cannot be asked; a failing shard is counted when read)."""
    names = storage.list_names(str(index.root), policy)
    if names is not None:
        have = set(names)
        return [url for url, info in zip(index.urls, index.shards) if info.name not in have]
    if str(index.root).startswith("pipe:"):
        return []
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda u: storage.exists(u, policy), index.urls))
    return [u for u, ok in zip(index.urls, found) if not ok]


def train_batches_per_epoch(cfg: DataConfig, index: ShardIndex, world_size: int) -> int:
    """Batches per rank per epoch: cfg.batches_per_epoch, or an estimate that makes about
    samples_per_epoch clips (default: the index's count / world size) from the mean clip length.
    Depends only on the config and the index, so every rank computes the same number."""
    if cfg.batches_per_epoch:
        return cfg.batches_per_epoch
    samples = cfg.samples_per_epoch or max(1, index.num_samples // world_size)
    if index.duration > 0:
        mean_frames = index.duration * index.fps / index.num_samples
    else:
        mean_frames = cfg.max_clip_frames / 2
        log.warning("index of %s has no durations; assuming clips of %.0f frames", index.split, mean_frames)
    per_batch = int(cfg.max_frames_per_batch / (BATCH_SIZE_SLACK * mean_frames))
    per_batch = max(1, min(cfg.max_batch_size, per_batch))
    return max(1, math.ceil(samples / per_batch))


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers survive the stop signals SLURM sends to every process of a job:
    they are forked with SIGTERM/SIGUSR1 blocked and ignore them from `_worker_init` on (torch's own
    worker handler would die of a SIGTERM that does not come from the parent). The trainer ends
    them by dropping the iterator (torch then shuts the workers down)."""

    def __iter__(self):
        with stop_signals_blocked():
            return super().__iter__()


def _loader(dataset: AVSRStream, num_workers: int, cfg: DataConfig) -> DataLoader:
    # A private generator: creating an iterator draws a worker base seed, and from the global
    # RNG that draw would shift LoRA-dropout masks, so a resumed run (loader made after the RNG
    # restore) would drift from an uninterrupted one. Our workers seed themselves anyway.
    return StopSafeLoader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=_worker_init,
                      prefetch_factor=cfg.prefetch_factor if num_workers > 0 else None,
                      persistent_workers=False, pin_memory=False,
                      generator=torch.Generator().manual_seed(cfg.seed))


def build_train_loader(cfg: DataConfig, streams: Streams, rank: int, world_size: int, epoch: int = 0) -> DataLoader:
    """One training epoch for this rank: len(loader) batches, identical on every rank. `streams`: what
    the model reads (`LlamaAVSR.input_streams`)."""
    _check_rank(rank, world_size)
    index = checked_index(cfg, cfg.train_split)
    n = train_batches_per_epoch(cfg, index, world_size)
    workers = min(cfg.num_workers, n)      # a worker with no batches to make would only cost startup
    ds = AVSRStream(cfg, streams, _shard_list(index), train=True, rank=rank, world_size=world_size, epoch=epoch,
                    batches=n, opener=RemoteOpener.for_index(cfg, index))
    return _loader(ds, workers, cfg)


def key_rank(key: str, world_size: int) -> int:
    """The rank that evaluates a sample when ranks split a small eval set by sample (stable hash)."""
    return zlib.crc32(key.encode("utf-8")) % world_size


def eval_workers(cfg: DataConfig, num_shards: int, rank: int, world_size: int) -> int:
    """Workers this rank can use so that each gets at least one shard (shard-level splitting)."""
    _check_rank(rank, world_size)
    own = len(range(rank, num_shards, world_size))
    if own == 0:
        raise ValueError(f"eval split has {num_shards} shard(s) but there are {world_size} ranks: "
                         f"rank {rank} would get no data")
    if cfg.num_workers > own:
        log.warning("eval rank %d has %d shard(s) for %d workers: using %d worker(s)",
                    rank, own, cfg.num_workers, own)
        return own
    return cfg.num_workers


def batch_budget(cfg: DataConfig, train: bool) -> tuple[int, int]:
    """(max frames per batch, max clips per batch) of training or evaluation batches."""
    if train:
        return cfg.max_frames_per_batch, cfg.max_batch_size
    return cfg.eval_max_frames_per_batch or cfg.max_frames_per_batch, cfg.eval_max_batch_size or cfg.max_batch_size


def build_eval_loader(cfg: DataConfig, streams: Streams, split: str | None, rank: int, world_size: int) -> DataLoader:
    """A single deterministic pass over `split` (default cfg.eval_split) for this rank, decoding `streams`."""
    _check_rank(rank, world_size)
    split = split or cfg.eval_split
    index = checked_index(cfg, split)
    if len(index.urls) < world_size:
        # Fewer shards than ranks (a small validation set): each rank reads all shards and keeps
        # the samples whose key hashes to it. Reads world_size times the bytes, so only for small sets.
        log.info("eval split %r has %d shard(s) for %d ranks: splitting by sample key",
                 split, len(index.urls), world_size)
        ds = AVSRStream(cfg, streams, _shard_list(index), train=False, rank=rank, world_size=world_size,
                        split_by_sample=True, opener=RemoteOpener.for_index(cfg, index))
        return _loader(ds, min(cfg.num_workers, len(index.urls)), cfg)
    workers = eval_workers(cfg, len(index.urls), rank, world_size)
    ds = AVSRStream(cfg, streams, _shard_list(index), train=False, rank=rank, world_size=world_size,
                    opener=RemoteOpener.for_index(cfg, index))
    return _loader(ds, workers, cfg)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
