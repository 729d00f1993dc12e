"""A Hugging Face hub cache laid out as huggingface_hub writes it, from the converted local folders:
models--{org}--{name}/blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LLM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHISPER_REPO = "openai/whisper-tiny.en"


def add_snapshot(cache: Path, repo_id: str, folder: Path, ref: str = "main") -> str:
    """Copy `folder` into the cache as one commit of `repo_id` named by `ref`; returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "conversion.json")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1((repo_id + ref + "".join(digests.values())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / digests[p.name]
        if not blob.exists():
            shutil.copyfile(p, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / p.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return commit


def hub_cache(root: Path, models: Path) -> tuple[Path, dict[str, str]]:
    """The cache with SmolLM2 and Whisper tiny.en under their hub names; repo id -> commit."""
    cache = root / "hub"
    commits = {LLM_REPO: add_snapshot(cache, LLM_REPO, models / "SmolLM2-135M-Instruct"),
               WHISPER_REPO: add_snapshot(cache, WHISPER_REPO, models / "whisper-tiny.en")}
    return cache, commits
