"""Writing WebDataset shards (DESIGN.md section 4) in parallel, plus their index.

A split's items are planned into shards up front (contiguous groups bounded by an
estimated byte size and a sample count), so the assignment of samples to shards
depends only on the inputs and the limits, never on the number of workers. Each
process then produces and writes whole shards: no shard is shared. A shard is
written under a hidden temporary name and moved to `{split}-{index:06d}.tar` only
when complete, so a reader never sees a half-written shard.

The output is a folder or an `s3://bucket/prefix` (trainer.data.storage.OutFolder): for S3 each
worker writes its shard to a local staging folder, uploads it under the temporary name and deletes
the local copy (local disk: about one shard per worker), and the renames are server-side copies.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from tqdm import tqdm

from trainer.data.shard_format import (AUDIO_KEYS, META_KEY, TEXT_KEY, VIDEO_KEY, ShardIndex, ShardInfo, index_name,
                                       shard_name)
from trainer.data.storage import OutFolder, redact

DEFAULT_MAX_BYTES = 1_000_000_000        # ~1 GB per shard in real use
TAR_MTIME = 0                          # fixed member times: identical inputs give identical tars
SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")


class SkipSample(Exception):
    """Raised by a producer for an input that cannot become a sample (counted, not fatal)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason      # short category, used to count skips
        self.detail = detail


@dataclass
class Sample:
    """One utterance in the shard format: keys wav, mp4, txt, json under one `__key__`."""
    key: str
    wav: bytes                 # PCM16 WAV, 16 kHz mono
    mp4: bytes                 # mouth-region video, 25 fps
    txt: str                   # transcript
    meta: dict                 # speaker, duration, num_frames, fps, sample_rate, source, dataset, split, ...

    def to_wds(self) -> dict[str, Any]:
        check_key(self.key)
        return {"__key__": self.key, AUDIO_KEYS[0]: self.wav, VIDEO_KEY: self.mp4, TEXT_KEY: self.txt.encode("utf-8"),
                META_KEY: json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}


class Item(Protocol):
    """What a producer turns into a Sample; it must be picklable and carry its sample key."""
    key: str


Producer = Callable[[Any], Sample]


class BatchProducer(Protocol):
    """A producer that is cheaper per item in batches (e.g. one ffmpeg run for many videos).

    produce_batch returns, per item in order, a Sample or the SkipSample for that item.
    """
    batch_size: int

    def __call__(self, item: Any) -> Sample: ...

    def produce_batch(self, items: list) -> list[Sample | SkipSample]: ...


def check_key(key: str) -> None:
    # WebDataset splits a member name at the first dot of its base name: a dot in the key
    # would silently move part of the key into the extension.
    # A '/' would make a folder inside the tar, and "__x__" names are WebDataset's own metadata.
    if not key or "." in key or "/" in key or key.startswith("__"):
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/', not start with '__'")


def plan_shards(sizes: Sequence[int], max_bytes: int | None, max_samples: int | None) -> list[range]:
    """Group item indices into contiguous shards, each within max_bytes (estimated) and max_samples.

    An item larger than max_bytes gets a shard of its own.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    groups: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        full_count = max_samples is not None and i - start >= max_samples
        full_bytes = max_bytes is not None and i > start and total + size > max_bytes
        if full_count or full_bytes:
            groups.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


@dataclass
class ShardResult:
    tmp_name: str                           # the shard's temporary name in the output folder
    samples: int
    duration: float
    nbytes: int
    skipped: list[tuple[str, str, str]]     # (item key, reason, detail)


@dataclass
class SplitResult:
    index: ShardIndex
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    written: bool = True        # False: no sample was usable, so no index was written

    @property
    def skip_counts(self) -> Counter:
        return Counter(reason for _, reason, _ in self.skipped)


_progress: Any = None      # per-process: a queue (worker) or a callable (inline) that counts done items


def _init_worker(progress_queue: Any) -> None:
    global _progress
    _progress = progress_queue


def _tick() -> None:
    if _progress is None:
        return
    if callable(_progress):
        _progress(1)
    else:
        _progress.put(1)


def add_sample(tar: tarfile.TarFile, sample: Sample) -> None:
    """Append one sample's members, as webdataset.TarWriter would, with fixed metadata for reproducible tars.

    Plain tarfile rather than TarWriter: importing webdataset imports torch (~3 s per worker).
    """
    entry = sample.to_wds()
    key = entry.pop("__key__")
    for ext in sorted(entry):
        data = entry[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
        info.uname = info.gname = "avsr"
        tar.addfile(info, io.BytesIO(data))


def _produce_one(producer: Producer, item: Any) -> Sample | SkipSample:
    try:
        return producer(item)
    except SkipSample as skip:
        return skip


def _write_shard(tmp_path: str, items: list, producer: Producer, upload: OutFolder | None = None) -> ShardResult:
    """Produce and write one whole shard (then upload it, for S3); runs in a worker process."""
    result = ShardResult(tmp_name=Path(tmp_path).name, samples=0, duration=0.0, nbytes=0, skipped=[])
    with open(tmp_path, "wb") as stream:
        # PAX: member names over 100 bytes (long keys) are valid; USTAR would fail the whole shard
        writer = tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT)
        try:
            batch_size = getattr(producer, "batch_size", 1) if hasattr(producer, "produce_batch") else 1
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                outputs = producer.produce_batch(batch) if batch_size > 1 else [_produce_one(producer, batch[0])]
                for item, sample in zip(batch, outputs, strict=True):
                    if isinstance(sample, SkipSample):
                        result.skipped.append((item.key, sample.reason, sample.detail))
                    else:
                        add_sample(writer, sample)
                        result.samples += 1
                        result.duration += float(sample.meta["duration"])
                    _tick()
        finally:
            writer.close()      # also on error, so the tar stream does not flush into a closed file later
        stream.flush()
        os.fsync(stream.fileno())
    result.nbytes = os.path.getsize(tmp_path)
    if upload is not None:
        try:
            if result.samples:
                upload.put(tmp_path, result.tmp_name)
        finally:
            os.unlink(tmp_path)
    return result


def existing_shards(out_dir: str | os.PathLike, split: str) -> list[Path]:
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (m := SHARD_RE.match(p.name)) and m["split"] == split)


def _shard_names(names: list[str], split: str) -> list[str]:
    return sorted(n for n in names if (m := SHARD_RE.match(n)) and m["split"] == split)


@dataclass
class SplitSpec:
    """One split to write: its items, their estimated sizes (for max_bytes) and the index's meta."""
    split: str
    items: Sequence[Item]
    sizes: Sequence[int] | None = None
    meta: dict = field(default_factory=dict)


def write_splits(specs: Sequence[SplitSpec], producer: Producer, out_dir: str | os.PathLike, *,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, max_samples: int | None = None, workers: int = 1,
                 overwrite: bool = False, progress: bool = True) -> dict[str, SplitResult]:
    """Write each split as `{split}-NNNNNN.tar` shards plus `{split}.index.json`, all splits in one pool.

    producer turns an item into a Sample; it must be picklable (a top-level function or an
    instance of a top-level class) and may raise SkipSample to skip an item.
    max_bytes applies to the estimated sizes (a split without sizes is bounded by max_samples only).
    workers: processes; 0 or 1 runs in this process.
    overwrite: replace the splits' existing shards and indexes (only once the new ones are written);
    without it they are an error.
    out_dir: a folder or an s3://bucket/prefix (credentials from the environment or ~/.aws).
    """
    t0 = time.perf_counter()
    out = OutFolder(out_dir)
    # where shards are written: the folder itself, or (S3) a local staging folder they are uploaded from
    staging = Path(tempfile.mkdtemp(prefix="avsr-shards-")) if out.remote else Path(out_dir)
    names = [spec.split for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"split names repeat: {names}")
    jobs: list[tuple[str, str, list]] = []            # (split, temporary path, items)
    for spec in specs:
        if not spec.split or "." in spec.split or "/" in spec.split:
            raise ValueError(f"split name {spec.split!r} must be non-empty, without '.' or '/'")
        keys = [item.key for item in spec.items]
        for key in keys:
            check_key(key)
        dupes = [k for k, n in Counter(keys).items() if n > 1]
        if dupes:
            raise ValueError(f"duplicate sample keys in split {spec.split!r}: {dupes[:5]}")
        _check_split(out, spec.split, overwrite)
        sizes = spec.sizes if spec.sizes is not None else [0] * len(spec.items)
        groups = plan_shards(sizes, max_bytes if spec.sizes is not None else None, max_samples)
        jobs += [(spec.split, str(staging / f".tmp-{spec.split}-{i:06d}.tar"), [spec.items[j] for j in g])
                 for i, g in enumerate(groups)]
    upload = out if out.remote else None

    total = sum(len(spec.items) for spec in specs)
    bar = tqdm(total=total, desc="/".join(names), unit="utt", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(bar.update)
            results = [_write_shard(tmp, chunk, producer, upload) for _, tmp, chunk in jobs]
        else:
            results = _run_pool([(tmp, chunk) for _, tmp, chunk in jobs], producer, min(workers, len(jobs)), bar,
                                upload)
    except BaseException:
        for _, tmp, _ in jobs:
            Path(tmp).unlink(missing_ok=True)
            if upload is not None:
                try:
                    upload.delete(Path(tmp).name)
                except OSError:
                    pass        # the next run of this split removes leftover temporary shards
        raise
    finally:
        _init_worker(None)
        bar.close()
        if out.remote:
            shutil.rmtree(staging, ignore_errors=True)

    out_results = {}
    for spec in specs:
        split_results = [r for (split, _, _), r in zip(jobs, results) if split == spec.split]
        out_results[spec.split] = _finish_split(out, spec, split_results)
        out_results[spec.split].seconds = time.perf_counter() - t0
    return out_results


def write_split(items: Sequence[Item], producer: Producer, out_dir: str | os.PathLike, split: str, *,
                sizes: Sequence[int] | None = None, meta: dict | None = None, **kwargs: Any) -> SplitResult:
    """write_splits for a single split; kwargs as there."""
    return write_splits([SplitSpec(split, items, sizes, dict(meta or {}))], producer, out_dir, **kwargs)[split]


def _finish_split(out: OutFolder, spec: SplitSpec, results: list[ShardResult]) -> SplitResult:
    root = out.location if out.remote else Path(out.location)
    skipped_all = [s for res in results for s in res.skipped]
    if not any(res.samples for res in results):
        # Nothing usable: no index is written (an empty one would block the rerun) and an old split
        # (--overwrite) is kept; the caller reports the skips.
        for res in results:
            out.delete(res.tmp_name)
        return SplitResult(index=ShardIndex(split=spec.split, shards=[], meta={**spec.meta, "skipped":
                                            len(skipped_all)}, root=root), skipped=skipped_all, written=False)
    # Every new shard of every split is written: only now does the old split go (--overwrite), the
    # index first, so a reader finds no index rather than one naming removed shards; the new index last.
    out.delete(index_name(spec.split))
    for name in _shard_names(out.names(), spec.split):
        out.delete(name)
    # Compact numbering: a shard whose items were all skipped is dropped (an empty tar
    # makes WebDataset fail), and the following ones move down.
    shards: list[ShardInfo] = []
    skipped: list[tuple[str, str, str]] = []
    for res in results:
        skipped.extend(res.skipped)
        if res.samples == 0:
            out.delete(res.tmp_name)
            continue
        name = shard_name(spec.split, len(shards))
        out.replace(res.tmp_name, name)
        shards.append(ShardInfo(name=name, samples=res.samples, duration=round(res.duration, 3)))
    index = ShardIndex(split=spec.split, shards=shards, meta={**spec.meta, "skipped": len(skipped)}, root=root)
    index.save(root)
    return SplitResult(index=index, skipped=skipped)


def _check_split(out: OutFolder, split: str, overwrite: bool) -> None:
    """Refuse an existing split unless overwrite; nothing old is removed until the new one is written."""
    names = out.names()
    old = _shard_names(names, split)
    has_index = index_name(split) in names
    if not old and has_index and _names_no_shards(out, split):
        out.delete(index_name(split))   # an empty index (left by an older version after a 0-sample run) blocks nothing
        has_index = False
    if (old or has_index) and not overwrite:
        raise FileExistsError(f"{redact(out.location)} already holds split {split!r} ({len(old)} shards"
                              f"{', an index' if has_index else ''}); pass overwrite=True / --overwrite")
    stale = re.compile(rf"\.tmp-{re.escape(split)}-\d{{6}}\.tar")
    for name in names:                       # leftovers of a crashed run of this split
        if stale.fullmatch(name):
            out.delete(name)


def _names_no_shards(out: OutFolder, split: str) -> bool:
    try:
        return not json.loads(out.read_bytes(index_name(split))).get("shards")
    except (OSError, ValueError, AttributeError):
        return False


def _run_pool(jobs: list[tuple[str, list]], producer: Producer, workers: int, bar: tqdm,
              upload: OutFolder | None = None) -> list[ShardResult]:
    # forkserver: safe even when the caller has threads (torch, pytest plugins) running.
    ctx = mp.get_context("forkserver")
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue,)) as pool:
        futures = [pool.submit(_write_shard, tmp, chunk, producer, upload) for tmp, chunk in jobs]
        failed = None
        while failed is None and not all(f.done() for f in futures):
            try:
                bar.update(progress_queue.get(timeout=0.2))
            except queue.Empty:
                pass
            failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None)
        if failed is not None:
            pool.shutdown(wait=True, cancel_futures=True)     # fail fast: do not finish the other shards
            raise failed.exception()
        results = [f.result() for f in futures]     # re-raises a worker's error here
    bar.update(bar.total - bar.n)                     # ticks still in the queue's pipe
    return results
