"""Transcripts of a shard set, read straight from the tars (for training a tokenizer)."""
from __future__ import annotations

import tarfile
from typing import Iterator

from trainer.data.index import load_index


def iter_transcripts(shard_dir: str, split: str) -> Iterator[str]:
    """Every sample's `txt` in index order; unreadable members are skipped (the loader counts them)."""
    for url in load_index(shard_dir, split).urls:
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".txt"):
                        f = tar.extractfile(member)
                        text = f.read().decode("utf-8", errors="replace").strip() if f else ""
                        if text:
                            yield text
        except (tarfile.TarError, OSError):
            continue
