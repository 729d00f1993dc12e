"""A bounded local folder of remote shards read before (DataConfig.cache_dir).

storage.open_stream looks a shard up here first; on a miss it streams the shard remotely through a
tee that writes the bytes it reads into the folder, admitted only once the shard was read to its end.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
_said_full = False          # the full-disk warning, once per process


class ShardCache:
    """A bounded local folder of remote shards read before, least recently used evicted first.

    A shard is cached only once it was read to its end (a shard given up on is not), under a name
    derived from its URL and `tag` (the index's digest: a rewritten split never hits stale copies).
    Written under a temporary name and renamed, so DataLoader workers and ranks can share one folder.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int, tag: str = ""):
        self.folder, self.max_bytes, self.tag = Path(folder), int(max_bytes), tag

    def path(self, url: str) -> Path:
        digest = hashlib.sha256(f"{url}\0{self.tag}".encode()).hexdigest()[:20]
        return self.folder / f"{digest}-{Path(urlsplit(url).path).name[:80] or 'shard'}"

    def lookup(self, url: str) -> Path | None:
        path = self.path(url)
        try:
            os.utime(path)        # a hit is a use: LRU order by modification time
            return path
        except FileNotFoundError:
            return None

    def tee(self, url: str, stream) -> "_CacheTee":
        self.folder.mkdir(parents=True, exist_ok=True)
        return _CacheTee(self, self.path(url), stream)

    def admit(self, tmp: Path, final: Path) -> None:
        if tmp.stat().st_size > self.max_bytes:
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, final)
        self.evict()

    def evict(self, free_at_least: int = 0) -> None:
        """Least recently used first, until the cache holds at most max_bytes and (a full disk) the disk
        has `free_at_least` bytes free."""
        entries = []
        for p in self.folder.iterdir():
            if p.name.startswith(".part-"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue         # evicted by another worker meanwhile
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes and (not free_at_least or shutil.disk_usage(self.folder).free >= free_at_least):
                break
            p.unlink(missing_ok=True)
            total -= size


class _CacheTee(io.RawIOBase):
    """Reads `stream` and writes what it reads to a cache file, admitted once the stream hit its end."""
    DRAIN_LIMIT = 1 << 20       # tar readers stop at the end-of-archive blocks: read the padding after them

    def __init__(self, cache: ShardCache, final: Path, stream):
        super().__init__()
        self.cache, self.final, self.stream = cache, final, stream
        self.tmp = final.with_name(f".part-{os.getpid()}-{final.name}")
        self.out = open(self.tmp, "wb")
        self.eof = False
        self.written = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.stream.read(len(buf))
        if not data:
            self.eof = True
        self._copy(data)
        buf[:len(data)] = data
        return len(data)

    def _copy(self, data: bytes) -> None:
        """Into the cache file; a full disk stops caching this shard (the read goes on) and evicts."""
        if self.out is None:
            return
        try:
            self.out.write(data)
            self.written += len(data)
        except OSError as err:
            self._give_up(err)

    def _give_up(self, err: OSError) -> None:
        global _said_full
        try:
            self.out.close()
        except OSError:
            pass
        self.out = None
        self.tmp.unlink(missing_ok=True)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise err
        self.cache.evict(free_at_least=self.written + (1 << 20))
        if not _said_full:
            _said_full = True
            log.warning("shard cache %s: disk full (%s); evicted the least recently used shards and reading on "
                        "without caching this one (said once)", self.cache.folder, err.strerror)

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.eof and self.out is not None:
                rest = self.stream.read(self.DRAIN_LIMIT) if not self.stream.closed else b""
                self._copy(rest)
                self.eof = len(rest) < self.DRAIN_LIMIT and not self.stream.read(1)
        except Exception:
            self.eof = False     # the shard failed: nothing goes into the cache
        finally:
            if self.out is not None:
                try:
                    self.out.close()
                except OSError as err:
                    self._give_up(err)
            self.stream.close()
            if self.eof and self.out is not None:
                self.cache.admit(self.tmp, self.final)
            else:
                self.tmp.unlink(missing_ok=True)
            super().close()
