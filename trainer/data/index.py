"""The shard-set index: one small JSON per split, next to its shards.

`{split}.index.json` lists the shards of a split with their sample counts and
total audio duration, so a loader can plan epochs, check that every
(rank, worker) gets a shard, and report progress without opening the tars.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    root: Path | None = None                   # folder of the index file; not serialised

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.shards)

    @property
    def urls(self) -> list[str]:
        root = self.root or Path(".")
        return [str(root / s.name) for s in self.shards]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d["num_samples"] = self.num_samples
        d["total_duration"] = round(self.duration, 3)
        return d

    def save(self, folder: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written index."""
        path = index_path(folder, self.split)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path


def index_path(folder: str | os.PathLike, split: str) -> Path:
    return Path(folder) / f"{split}.index.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def load_index(folder: str | os.PathLike, split: str) -> ShardIndex:
    """Read `{folder}/{split}.index.json`; clear errors for a missing or malformed index."""
    path = index_path(folder, split)
    if not path.is_file():
        available = sorted(p.name for p in Path(folder).glob("*.index.json")) if Path(folder).is_dir() else []
        raise FileNotFoundError(
            f"no shard index for split {split!r} at {path} (indexes in that folder: {available or 'none'}); "
            f"build shards with `python -m data_tools synth` or `python -m data_tools lrs3`")
    try:
        raw = json.loads(path.read_text())
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), duration=float(s["duration"]))
                  for s in raw["shards"]]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"malformed shard index {path}: {err}") from err
    if raw.get("version", INDEX_VERSION) > INDEX_VERSION:
        raise ValueError(f"{path} has index version {raw['version']}, newer than this code ({INDEX_VERSION})")
    return ShardIndex(split=raw.get("split", split), shards=shards, sample_rate=int(raw.get("sample_rate", 16000)),
                      fps=float(raw.get("fps", 25.0)), meta=raw.get("meta", {}), version=raw.get("version", 1),
                      root=path.parent)
