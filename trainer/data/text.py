"""Transcripts of a shard set, read straight from the tars (for training a tokenizer)."""
from __future__ import annotations

import contextlib
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from trainer.data import storage
from trainer.data.shard_format import load_index


@contextlib.contextmanager
def _open(url: str) -> Iterator[tarfile.TarFile]:
    if not storage.is_remote(url):
        with tarfile.open(url) as tar:
            yield tar
        return
    with storage.open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:   # streamed
        yield tar


@dataclass
class TranscriptCount:
    """What a pass over a split's transcripts found, against what its index promises."""
    expected: int = 0            # samples the index lists
    used: int = 0                # non-empty transcripts read
    unreadable_shards: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.used} of {self.expected} transcripts"
        if self.unreadable_shards:
            shown = ", ".join(self.unreadable_shards[:3])
            text += f" ({len(self.unreadable_shards)} unreadable shard(s): {shown})"
        return text


def iter_transcripts(shard_dir: str, split: str, count: TranscriptCount | None = None) -> Iterator[str]:
    """Every sample's non-empty `txt` in index order (shards local or remote); unreadable shards and
    members are skipped and, with `count`, counted."""
    index = load_index(shard_dir, split)
    count = count if count is not None else TranscriptCount()
    count.expected = index.num_samples
    for url in index.urls:
        try:
            with _open(url) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        f = tar.extractfile(member)
                        text = f.read().decode("utf-8", errors="replace").strip() if f else ""
                        if text:
                            count.used += 1
                            yield text
        except (tarfile.TarError, OSError):
            count.unreadable_shards.append(url.rsplit("/", 1)[-1])
            continue
