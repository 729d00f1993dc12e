"""Convert LRS3 / LRS2 as prepared by the auto_avsr tools into shards.

Layout: a folder per speaker (at any depth under SRC_DIR) holding `NNNNN.mp4` mouth
crops, `NNNNN.wav` 16 kHz audio (optional: else extracted from the mp4 with ffmpeg)
and `NNNNN.txt` whose first line is "Text:  THE TRANSCRIPT" (a first line without the
"Text:" prefix is taken whole). Inputs that cannot be read are skipped and counted by
reason; the report lists them at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from trainer.data.shard_format import (FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, MediaDecodeError, decode_audio,
                                       decode_video, fit_length)
from trainer.data.storage import redact

from .command import run_command
from .media import MediaError, encode_wav, load_audio_16k
from .shards import DEFAULT_MAX_BYTES, Sample, SkipSample, SplitResult, write_split


@dataclass(frozen=True)
class LRS3Item:
    key: str
    stem: str               # absolute path without extension
    rel: str                # path of the stem relative to the source folder (the json's `source`)
    speaker: str
    split: str
    dataset: str
    max_mismatch_frames: float

    @property
    def estimated_bytes(self) -> int:
        mp4 = Path(self.stem + ".mp4")
        wav = Path(self.stem + ".wav")
        size = mp4.stat().st_size if mp4.is_file() else 0
        # no wav: the extracted PCM16 is typically about twice the size of a mouth-crop mp4
        return size + (wav.stat().st_size if wav.is_file() else 2 * size) + 2048


def sample_key(rel_stem: str) -> str:
    """A WebDataset key from a relative path: no dots, no slashes."""
    return rel_stem.replace(os.sep, "_").replace("/", "_").replace(".", "_")


def discover(src_dir: str | os.PathLike, split: str, dataset: str, max_mismatch_frames: float) -> list[LRS3Item]:
    """Every utterance stem (an mp4 or a txt) under src_dir, in sorted path order."""
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"LRS3 source folder {src} does not exist")
    stems: set[str] = set()
    for dirpath, _, files in os.walk(src):
        for f in files:
            if f.endswith((".mp4", ".txt")):
                stems.add(str(Path(dirpath, f).with_suffix("").relative_to(src)))
    items = []
    for rel in sorted(stems):
        parent = Path(rel).parent
        speaker = parent.name or src.name
        items.append(LRS3Item(key=sample_key(rel), stem=str(src / rel), rel=rel, speaker=speaker, split=split,
                              dataset=dataset, max_mismatch_frames=max_mismatch_frames))
    return items


def read_transcript(path: Path) -> str:
    try:
        first = path.read_text(encoding="utf-8").splitlines()[:1]
    except UnicodeDecodeError as err:
        raise SkipSample("transcript not UTF-8", f"{path}: {err}") from err
    line = first[0].strip() if first else ""
    if line.startswith("Text:"):
        line = line[len("Text:"):].strip()
    if not line:
        raise SkipSample("empty transcript", str(path))
    return line


def convert_item(item: LRS3Item) -> Sample:
    """One utterance -> Sample; raises SkipSample with a reason for unusable inputs."""
    mp4_path, wav_path, txt_path = (Path(item.stem + ext) for ext in (".mp4", ".wav", ".txt"))
    if not mp4_path.is_file():
        raise SkipSample("no mp4", str(mp4_path))
    if not txt_path.is_file():
        raise SkipSample("no transcript", str(txt_path))
    text = read_transcript(txt_path)
    mp4 = mp4_path.read_bytes()
    try:
        _, video = decode_video(mp4, read_frames=True)     # every frame: a truncated file fails here
    except MediaDecodeError as err:
        raise SkipSample("video does not decode", f"{mp4_path}: {err}") from err
    if abs(video.fps - FPS) > 0.01:
        raise SkipSample("video not 25 fps", f"{mp4_path}: {video.fps:g} fps")

    audio_from = "wav" if wav_path.is_file() else "mp4"
    try:
        if wav_path.is_file():
            audio, info = decode_audio(wav_path.read_bytes())
            if info.sample_rate != SAMPLE_RATE or info.channels != 1:
                audio = load_audio_16k(wav_path)          # resample / downmix with ffmpeg
        else:
            audio = load_audio_16k(mp4_path)
    except (MediaError, MediaDecodeError) as err:
        raise SkipSample(f"audio does not decode ({audio_from})", f"{item.stem}: {err}") from err
    if len(audio) == 0:
        raise SkipSample(f"empty audio ({audio_from})", item.stem)

    target = video.num_frames * SAMPLES_PER_FRAME
    gap = (len(audio) - target) / SAMPLES_PER_FRAME
    if abs(gap) > item.max_mismatch_frames:
        raise SkipSample("audio/video length mismatch", f"{item.stem}: audio off by {gap:+.1f} frames")
    audio = fit_length(audio, target)       # small codec padding differences: make them agree exactly
    meta = {"speaker": item.speaker, "duration": round(video.num_frames / FPS, 3), "num_frames": video.num_frames,
            "fps": FPS, "sample_rate": SAMPLE_RATE, "source": item.rel + ".mp4", "dataset": item.dataset,
            "split": item.split, "width": video.width, "height": video.height, "audio_from": audio_from}
    return Sample(key=item.key, wav=encode_wav(audio), mp4=mp4, txt=text, meta=meta)


def convert(src_dir: str | os.PathLike, out_dir: str | os.PathLike, split: str, *, dataset: str = "lrs3",
            workers: int | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES,
            samples_per_shard: int | None = None, max_mismatch_frames: float = 5.0, overwrite: bool = False,
            progress: bool = True) -> SplitResult:
    """Convert every utterance under src_dir into `{out_dir}/{split}-NNNNNN.tar` + `{split}.index.json`."""
    items = discover(src_dir, split, dataset, max_mismatch_frames)
    if not items:
        raise FileNotFoundError(f"no .mp4 or .txt files under {src_dir}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    meta = {"tool": "data_tools.lrs3", "source": str(Path(src_dir).resolve()), "dataset": dataset,
            "max_mismatch_frames": max_mismatch_frames}
    return write_split(items, convert_item, out_dir, split, sizes=[i.estimated_bytes for i in items],
                       max_bytes=max_bytes, max_samples=samples_per_shard, workers=workers, meta=meta,
                       overwrite=overwrite, progress=progress)


def format_skips(result: SplitResult, examples: int = 3) -> str:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for key, reason, detail in result.skipped:
        by_reason[reason].append(detail or key)
    lines = [f"skipped {len(result.skipped)} inputs"]
    for reason, details in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(details):6d}  {reason}")
        lines.extend(f"          e.g. {d}" for d in details[:examples])
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="LRS3/LRS2 folder prepared by auto_avsr (speaker folders of mp4/wav/txt)")
    p.add_argument("out", help="output folder, or s3://bucket/prefix, for the shards and the index")
    p.add_argument("--split", required=True, help="split name for the shards, e.g. train, val, test")
    p.add_argument("--dataset", default="lrs3", help="dataset name stored in each sample's json (default lrs3)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_MAX_BYTES,
                   help="max shard size in bytes, from the input file sizes (default 1e9)")
    p.add_argument("--samples-per-shard", type=int, default=None, help="max samples per shard (default: no limit)")
    p.add_argument("--max-mismatch-frames", type=float, default=5.0,
                   help="skip an utterance whose audio and video lengths differ by more frames (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace this split's shards and index in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    result = convert(args.src, args.out, args.split, dataset=args.dataset, workers=args.workers,
                     max_bytes=args.shard_size, samples_per_shard=args.samples_per_shard,
                     max_mismatch_frames=args.max_mismatch_frames, overwrite=args.overwrite,
                     progress=not args.quiet)
    idx = result.index
    if not result.written:
        print(f"{args.split}: no usable utterance of {len(result.skipped)} inputs; nothing written to {args.out} "
              f"(fix the inputs and run the same command again)")
        print(format_skips(result))
        return 1
    print(f"{args.split}: {idx.num_samples} utterances, {idx.duration / 3600:.3f} h, {len(idx.shards)} shards "
          f"in {redact(args.out)} ({time.perf_counter() - t0:.1f} s)")
    if result.skipped:
        print(format_skips(result))
    return 0 if idx.num_samples > 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="avsr-lrs3", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_command(sys.modules[__name__], p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
