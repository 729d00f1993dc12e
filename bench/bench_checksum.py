"""What sealing and verifying a checkpoint costs: checksum speed on a file of realistic size.

A ZeRO-3 checkpoint of the LRS3 recipes holds what DeepSpeed trains (LoRA r 48 on q/v of Llama-3.2-3B
and the projectors, ~40 M parameters: fp32 weights + two Adam moments ~0.5 GB over all ranks) plus the
small model-state files. This writes a file of that size (random bytes), then times SHA-256 (what the
manifest uses), BLAKE2b and CRC-32 over it, read through the page cache as at save time and, with
--cold, after asking the kernel to drop it (as at resume after a reboot; needs root).

    python bench/bench_checksum.py --mib 512 [--cold] [--csv checksum.csv]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path

from trainer.engine.checkpoint import file_digest

CHUNK = 8 << 20


def _stream(path: Path, update) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            update(chunk)


def crc32(path: Path) -> str:
    value = 0

    def update(chunk):
        nonlocal value
        value = zlib.crc32(chunk, value)
    _stream(path, update)
    return f"{value:08x}"


def blake2b(path: Path) -> str:
    h = hashlib.blake2b()
    _stream(path, h.update)
    return h.hexdigest()


def drop_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=512, help="file size in MiB (default 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="also time reads after dropping the page cache")
    p.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "optim_states.bin"
        with open(path, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        algos = {"sha256 (manifest)": file_digest, "blake2b": blake2b, "crc32": crc32}
        modes = ["page cache"] + (["cold"] if args.cold else [])
        for mode in modes:
            for name, fn in algos.items():
                best = float("inf")
                for _ in range(args.repeats):
                    if mode == "cold" and not drop_cache(path):
                        break
                    t0 = time.perf_counter()
                    fn(path)
                    best = min(best, time.perf_counter() - t0)
                rows.append({"algorithm": name, "read": mode, "mib": args.mib, "seconds": round(best, 3),
                             "mib_per_s": round(args.mib / best, 1)})
                print(f"{name:18s} {mode:10s} {args.mib} MiB: {best:6.2f} s  ({args.mib / best:7.1f} MiB/s)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
