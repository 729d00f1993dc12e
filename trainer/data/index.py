"""The shard-set index: one small JSON per split, next to its shards.

`{split}.index.json` lists the shards of a split with their sample counts and
total audio duration, so a loader can plan epochs, check that every
(rank, worker) gets a shard, and report progress without opening the tars.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import storage

INDEX_VERSION = 1


@dataclass
class ShardInfo:
    name: str            # file name relative to the index's folder, e.g. "train-000000.tar"
    samples: int
    duration: float      # seconds of audio in the shard


@dataclass
class ShardIndex:
    split: str
    shards: list[ShardInfo]
    sample_rate: int = 16000
    fps: float = 25.0
    meta: dict = field(default_factory=dict)   # who wrote it, from what, with which options
    version: int = INDEX_VERSION
    root: Path | str | None = None             # folder (or remote prefix) of the index file; not serialised
    digest: str = ""                           # sha256 of the index file as read; not serialised

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.shards)

    @property
    def urls(self) -> list[str]:
        if storage.is_remote(self.root):
            return [storage.join(self.root, s.name) for s in self.shards]
        root = self.root or Path(".")
        return [str(root / s.name) for s in self.shards]

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d.pop("digest")
        d["num_samples"] = self.num_samples
        d["total_duration"] = round(self.duration, 3)
        return d

    def save(self, folder: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written index."""
        if storage.is_remote(folder):
            storage.OutFolder(folder).write_bytes(index_name(self.split), json.dumps(self.to_dict(), indent=2).encode())
            return storage.join(folder, index_name(self.split))
        path = index_path(folder, self.split)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path


def index_name(split: str) -> str:
    return f"{split}.index.json"


def index_path(folder: str | os.PathLike, split: str) -> Path:
    return Path(folder) / index_name(split)


def index_location(folder: str | os.PathLike, split: str) -> str:
    """Where the index of `split` is: a local path, or a URL under a remote prefix."""
    return storage.join(folder, index_name(split))


def available_splits(folder: str | os.PathLike) -> list[str] | None:
    """Splits with an index in `folder` (a folder or s3:// prefix); None where the store cannot list."""
    names = storage.list_names(str(folder))
    if names is None:
        return None
    return sorted(n[:-len(".index.json")] for n in names if n.endswith(".index.json"))


# a shard name is a plain file name next to the index: an index cannot point elsewhere (another
# folder, another host, or a pipe: command)
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def load_index(folder: str | os.PathLike, split: str,
               policy: storage.RetryPolicy = storage.RetryPolicy()) -> ShardIndex:
    """Read `{folder}/{split}.index.json` (a folder or remote prefix); clear errors for a missing,
    unreachable or malformed index."""
    if storage.is_remote(folder):
        path = index_location(folder, split)
        try:
            data = storage.read_bytes(path, policy)
        except FileNotFoundError:
            raise _missing_index(folder, split, path, available_splits_or_none(folder, policy)) from None
        except OSError as err:
            raise storage.RemoteError(f"cannot read the {split!r} shard index {storage.redact(path)}: "
                                      f"{storage.redact(str(err))}") from err
        root: Path | str = folder
    else:
        path = index_path(folder, split)
        if not path.is_file():
            available = sorted(p.name for p in Path(folder).glob("*.index.json")) if Path(folder).is_dir() else []
            raise _missing_index(folder, split, path, available)
        data = path.read_bytes()
        root = path.parent
    try:
        raw = json.loads(data)
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), duration=float(s["duration"]))
                  for s in raw["shards"]]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"malformed shard index {storage.redact(str(path))}: {err}") from err
    bad = [s.name for s in shards if not SAFE_NAME.match(s.name)]
    if bad:
        raise ValueError(f"shard index {storage.redact(str(path))} names files outside its folder: {bad[:3]}")
    if raw.get("version", INDEX_VERSION) > INDEX_VERSION:
        raise ValueError(f"{path} has index version {raw['version']}, newer than this code ({INDEX_VERSION})")
    return ShardIndex(split=raw.get("split", split), shards=shards, sample_rate=int(raw.get("sample_rate", 16000)),
                      fps=float(raw.get("fps", 25.0)), meta=raw.get("meta", {}), version=raw.get("version", 1),
                      root=root, digest=hashlib.sha256(data).hexdigest())


def check_split(shard_dir: str | os.PathLike, split: str) -> None:
    """A clear error unless `shard_dir` (a folder or remote location) holds an index for `split`."""
    if not shard_dir:
        raise FileNotFoundError("no shard location (a run folder's own is not used when it is a pipe: "
                                "command): pass --shards")
    storage.check_location(str(shard_dir))
    if storage.is_remote(shard_dir):
        if not storage.exists(index_location(shard_dir, split)):
            have = available_splits_or_none(str(shard_dir), storage.RetryPolicy())
            raise FileNotFoundError(f"no split {split!r} at {storage.redact(str(shard_dir))} (no "
                                    f"{index_name(split)}); splits there: "
                                    f"{'cannot list' if have is None else have or 'none'}")
        return
    shards = Path(shard_dir)
    if not shards.is_dir():
        raise FileNotFoundError(f"shard folder not found: {shards}")
    if not index_path(shards, split).is_file():
        have = sorted(p.name.removesuffix(".index.json") for p in shards.glob("*.index.json"))
        raise FileNotFoundError(f"no split {split!r} in {shards} (no {index_name(split)}); "
                                f"splits there: {have or 'none'}")


def available_splits_or_none(folder: str, policy: storage.RetryPolicy) -> list[str] | None:
    try:
        return available_splits(folder)
    except OSError:
        return None


def _missing_index(folder, split: str, path, available) -> FileNotFoundError:
    listing = "cannot list" if available is None else (available or "none")
    return FileNotFoundError(
        f"no shard index for split {split!r} at {storage.redact(str(path))} (indexes there: {listing}); "
        f"build shards with `python -m data_tools synth` or `python -m data_tools lrs3`")
