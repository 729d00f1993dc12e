"""Check a shard set: the index against the tars, and every sample's content.

Per sample: all of wav (or flac), mp4, txt, json present; audio decodes, 16 kHz, mono,
non-empty; video decodes with decord from the bytes (as the loader does), 25 fps, an
expected frame size; audio length = frames x 640 within a tolerance; txt non-empty
UTF-8; json parses and agrees with the media.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from trainer.data import storage
from trainer.data.shard_format import (AUDIO_KEYS, FPS, META_KEY, SAMPLE_RATE, TEXT_KEY, VIDEO_KEY, MediaDecodeError,
                                       ShardIndex, ShardTotals, available_splits, decode_audio, decode_video,
                                       load_index)

from .command import run_command
from .shards import SHARD_RE

REQUIRED_META = ("speaker", "duration", "num_frames", "dataset", "split")
# the same rule WebDataset uses: the key is the member name up to the first dot of its base name
MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass
class Problem:
    shard: str
    key: str | None        # None: a problem of the shard or the index, not of one sample
    message: str

    def __str__(self) -> str:
        return f"{self.shard}{':' + self.key if self.key else ''}: {self.message}"


@dataclass
class ShardReport:
    name: str
    samples: int = 0
    duration: float = 0.0
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class SplitReport(ShardTotals):
    split: str
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)   # index-level problems

    @property
    def all_problems(self) -> list[Problem]:
        return self.problems + [p for s in self.shards for p in s.problems]


@dataclass
class ValidationReport:
    root: Path | str
    splits: dict[str, SplitReport] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.splits.values() for p in s.all_problems]

    @property
    def ok(self) -> bool:
        return bool(self.splits) and not self.problems

    def format(self, max_problems: int = 50) -> str:
        lines = [f"shard set {storage.redact(str(self.root))}"]
        for s in self.splits.values():
            lines.append(f"  {s.split:8s} {len(s.shards):4d} shards {s.num_samples:8d} samples "
                         f"{s.duration / 3600:8.3f} h  {len(s.all_problems)} problems")
        probs = self.problems
        for p in probs[:max_problems]:
            lines.append(f"  PROBLEM {p}")
        if len(probs) > max_problems:
            lines.append(f"  ... and {len(probs) - max_problems} more problems")
        if not self.splits:
            lines.append("  no split found (no *.index.json)")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


@dataclass(frozen=True)
class Checks:
    sample_rate: int = SAMPLE_RATE
    fps: float = FPS
    frame_sizes: tuple[int, ...] = (88, 96)    # square frames, per DESIGN.md section 4
    tolerance_frames: float = 2.0              # allowed |audio - frames x 640|, in frames
    decode_frames: bool = True                 # decode every frame (catches truncation), not just the first


def _open_tar(path: Path | str) -> tarfile.TarFile:
    if not storage.is_remote(path):
        return tarfile.open(path, mode="r:")
    stream = storage.open_stream(str(path))       # streamed, resuming after transient errors
    tar = tarfile.open(fileobj=stream, mode="r|")
    close = tar.close

    def close_both() -> None:
        close()
        stream.close()
    tar.close = close_both
    return tar


def iter_samples(path: Path | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar (a file or a remote URL), grouping consecutive members
    like WebDataset."""
    current: str | None = None
    parts: dict[str, bytes] = {}
    with _open_tar(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            m = MEMBER_RE.match(member.name)
            if m is None:
                raise ValueError(f"member {member.name!r} has no extension")
            key, ext = m.group(1), m.group(2)
            if key != current:
                if current is not None:
                    yield current, parts
                current, parts = key, {}
            if ext in parts:
                raise ValueError(f"duplicate member {member.name!r}")
            parts[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current, parts


def check_sample(key: str, parts: dict[str, bytes], checks: Checks) -> tuple[float, list[str]]:
    """(audio seconds, problems) for one sample."""
    errors: list[str] = []
    audio_key = next((k for k in AUDIO_KEYS if k in parts), None)
    missing = [k for k in (VIDEO_KEY, TEXT_KEY, META_KEY) if k not in parts] + ([] if audio_key else [AUDIO_KEYS[0]])
    if missing:
        errors.append(f"missing {', '.join(missing)} (has {', '.join(sorted(parts)) or 'nothing'})")
    duration, num_samples, num_frames = 0.0, None, None
    if audio_key:
        try:
            _, info = decode_audio(parts[audio_key])
            num_samples, duration = info.num_samples, info.duration
            if info.sample_rate != checks.sample_rate:
                errors.append(f"audio sample rate {info.sample_rate}, expected {checks.sample_rate}")
            if info.channels != 1:
                errors.append(f"audio has {info.channels} channels, expected mono")
            if info.num_samples == 0:
                errors.append("audio is empty")
        except MediaDecodeError as err:
            errors.append(str(err))
    if VIDEO_KEY in parts:
        try:
            frames, vinfo = decode_video(parts[VIDEO_KEY], read_frames=checks.decode_frames)
            num_frames = vinfo.num_frames
            if frames is not None and len(frames) != vinfo.num_frames:
                errors.append(f"video decodes {len(frames)} of {vinfo.num_frames} frames")
            if abs(vinfo.fps - checks.fps) > 0.01:
                errors.append(f"video at {vinfo.fps:g} fps, expected {checks.fps:g}")
            if vinfo.height != vinfo.width or vinfo.height not in checks.frame_sizes:
                errors.append(f"frame size {vinfo.width}x{vinfo.height}, expected square "
                              f"{' or '.join(str(s) for s in checks.frame_sizes)}")
        except MediaDecodeError as err:
            errors.append(str(err))
    if num_samples is not None and num_frames is not None:
        spf = checks.sample_rate / checks.fps     # 640 at 16 kHz and 25 fps
        gap = num_samples - num_frames * spf
        if abs(gap) > checks.tolerance_frames * spf:
            errors.append(f"audio {num_samples} samples vs video {num_frames} frames x {spf:g} "
                          f"(off by {gap / spf:+.2f} frames)")
    if TEXT_KEY in parts:
        try:
            if not parts[TEXT_KEY].decode("utf-8").strip():
                errors.append("empty transcript")
        except UnicodeDecodeError as err:
            errors.append(f"transcript is not UTF-8: {err}")
    if META_KEY in parts:
        try:
            meta = json.loads(parts[META_KEY].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            absent = [k for k in REQUIRED_META if k not in meta]
            if absent:
                errors.append(f"json lacks {', '.join(absent)}")
            if num_frames is not None and "num_frames" in meta and meta["num_frames"] != num_frames:
                errors.append(f"json num_frames {meta['num_frames']} != video's {num_frames}")
        except (UnicodeDecodeError, ValueError) as err:
            errors.append(f"json does not parse: {err}")
    return duration, errors


def check_shard(path: Path | str, checks: Checks) -> ShardReport:
    name = path.name if isinstance(path, Path) else str(path).rsplit("/", 1)[-1]
    report = ShardReport(name=name)
    try:
        for key, parts in iter_samples(path):
            duration, errors = check_sample(key, parts, checks)
            report.samples += 1
            report.duration += duration
            report.keys.append(key)
            report.problems.extend(Problem(name, key, e) for e in errors)
    except (tarfile.TarError, OSError, ValueError) as err:
        report.problems.append(Problem(name, None, f"unreadable tar after {report.samples} samples: "
                                                   f"{storage.redact(str(err))}"))
    return report


def _check_shard_args(args: tuple[Path, Checks]) -> ShardReport:
    return check_shard(*args)


def validate_split(root: str | os.PathLike, split: str, checks: Checks = Checks(), workers: int = 1) -> SplitReport:
    """Check one split of a folder or remote prefix (s3://, http(s)://, pipe:)."""
    if storage.is_remote(root):
        return _validate_remote_split(str(root), split, checks, workers)
    root = Path(root)
    report = SplitReport(split=split)
    try:
        index: ShardIndex | None = load_index(root, split)
    except (FileNotFoundError, ValueError) as err:
        report.problems.append(Problem(f"{split}.index.json", None, str(err)))
        index = None
    on_disk = sorted(p.name for p in root.glob(f"{split}-*.tar") if (m := SHARD_RE.match(p.name)) and m["split"] == split)
    listed = [s.name for s in index.shards] if index else on_disk
    if index is not None:
        for name in sorted(set(on_disk) - set(listed)):
            report.problems.append(Problem(name, None, "tar not listed in the index"))
        if not index.shards:
            report.problems.append(Problem(f"{split}.index.json", None, "index lists no shards"))
    present = [n for n in listed if (root / n).is_file()]
    for name in sorted(set(listed) - set(present)):
        report.problems.append(Problem(name, None, "listed in the index but missing"))
    _check_shards(report, index, [(root / n, checks) for n in present], workers)
    return report


def _validate_remote_split(root: str, split: str, checks: Checks, workers: int) -> SplitReport:
    report = SplitReport(split=split)
    try:
        index: ShardIndex | None = load_index(root, split)
    except (FileNotFoundError, ValueError, storage.RemoteError) as err:
        report.problems.append(Problem(f"{split}.index.json", None, str(err)))
        return report
    names = storage.list_names(root)           # None: HTTP and pipe: cannot list, so no unlisted-tar check
    listed = [s.name for s in index.shards]
    if not listed:
        report.problems.append(Problem(f"{split}.index.json", None, "index lists no shards"))
    if names is not None:
        on_store = {n for n in names if (m := SHARD_RE.match(n)) and m["split"] == split}
        for name in sorted(on_store - set(listed)):
            report.problems.append(Problem(name, None, "tar not listed in the index"))
        present = [n for n in listed if n in on_store]
    elif root.startswith("pipe:"):
        present = listed                       # reading each shard tells
    else:
        present = [n for n in listed if storage.exists(storage.join(root, n))]
    for name in sorted(set(listed) - set(present)):
        report.problems.append(Problem(name, None, "listed in the index but missing"))
    _check_shards(report, index, [(storage.join(root, n), checks) for n in present], workers)
    return report


def _check_shards(report: SplitReport, index: ShardIndex | None, jobs: list, workers: int) -> None:
    """Read every shard (in processes when workers > 1) and compare keys, counts and durations."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("forkserver")) as pool:
            report.shards = list(pool.map(_check_shard_args, jobs))
    else:
        report.shards = [check_shard(*job) for job in jobs]
    seen: dict[str, str] = {}
    for sr in report.shards:
        for key in sr.keys:
            if key in seen:
                report.problems.append(Problem(sr.name, key, f"duplicate key (also in {seen[key]})"))
            seen[key] = sr.name
    if index is not None:
        by_name = {s.name: s for s in index.shards}
        for sr in report.shards:
            info = by_name[sr.name]
            if info.samples != sr.samples:
                report.problems.append(Problem(sr.name, None, f"index says {info.samples} samples, tar has {sr.samples}"))
            # the index rounds each shard's duration; allow that plus a few ms per sample
            if abs(info.duration - sr.duration) > 0.01 + 0.005 * sr.samples:
                report.problems.append(Problem(sr.name, None, f"index says {info.duration:.3f} s, "
                                                              f"audio adds up to {sr.duration:.3f} s"))


def find_splits(root: str | os.PathLike) -> list[str]:
    if not storage.is_remote(root):
        return sorted(p.name[:-len(".index.json")] for p in Path(root).glob("*.index.json"))
    splits = available_splits(str(root))
    if splits is None:
        raise ValueError(f"{storage.redact(str(root))} cannot be listed (HTTP, pipe:): name the splits with --split")
    return splits


def validate(root: str | os.PathLike, splits: Sequence[str] | None = None, checks: Checks = Checks(),
             workers: int = 1) -> ValidationReport:
    """Check the given splits (default: every `*.index.json` in root, a folder or s3:// prefix)."""
    root = root if storage.is_remote(root) else Path(root)
    report = ValidationReport(root=root)
    for split in splits or find_splits(root):
        report.splits[split] = validate_split(root, split, checks, workers)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder with {split}-NNNNNN.tar shards and {split}.index.json, or the same under "
                               "s3://bucket/prefix, https://host/prefix or pipe:CMD ({name} in CMD)")
    p.add_argument("--split", action="append", default=None,
                   help="split to check; repeat for several (default: every split with an index)")
    p.add_argument("--workers", type=int, default=1, help="processes checking shards in parallel (default 1)")
    p.add_argument("--tolerance-frames", type=float, default=Checks.tolerance_frames,
                   help="allowed audio/video length mismatch, in video frames (default 2)")
    p.add_argument("--frame-sizes", type=str, default="88,96",
                   help="comma-separated allowed square frame sizes (default 88,96)")
    p.add_argument("--first-frame-only", action="store_true",
                   help="decode only each video's first frame (faster, misses truncated videos)")
    p.add_argument("--max-problems", type=int, default=50, help="problems to print (default 50)")


def run(args: argparse.Namespace) -> int:
    if not storage.is_remote(args.dir) and not Path(args.dir).is_dir():
        print(f"error: {args.dir} is not a folder", file=sys.stderr)
        return 2
    storage.check_location(args.dir)
    checks = Checks(tolerance_frames=args.tolerance_frames, decode_frames=not args.first_frame_only,
                    frame_sizes=tuple(int(s) for s in args.frame_sizes.split(",") if s.strip()))
    report = validate(args.dir, args.split, checks, args.workers)
    print(report.format(args.max_problems))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="avsr-validate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_command(sys.modules[__name__], p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
