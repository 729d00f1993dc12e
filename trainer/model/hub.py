"""Pretrained folders by hub name or local path: `--model.llm-path meta-llama/Llama-3.2-1B` and
`--model.llm-path /models/llama` alike.

A value that is an existing folder is used as it is. Anything else that reads as a Hugging Face repo
id (`org/name` or `name`) goes through `huggingface_hub.snapshot_download`: its cache (`HF_HUB_CACHE`,
`HF_HOME`), `HF_HUB_OFFLINE=1` (the cache only, nothing fetched) and a revision pin (branch, tag or
commit hash; `--model.llm-revision`). Only what a transformers model needs is fetched (configs,
tokenizer files, safetensors weights), never Meta's `original/*.pth` or TF/Flax copies.
The resolved commit is what MLflow records and what the run's experiment.json pins, so a later
evaluation reads the same weights.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

# What a transformers causal LM / Whisper folder needs (weights in safetensors; tokenizers of every kind).
ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "merges.txt",
                  "vocab.*")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class PretrainedNotFound(ValueError):
    """A --model.*-path that is neither a folder nor a repo id the hub (or its cache) resolves."""


@dataclass(frozen=True)
class Resolved:
    value: str
    """What the user wrote."""
    folder: Path
    """The local folder to read."""
    repo_id: str | None = None
    """The hub repo id, when the value was one."""
    revision: str | None = None
    """The revision asked for (None: the default branch)."""
    commit: str | None = None
    """The commit hash of the snapshot read (the cache's snapshots/<commit> folder)."""

    def params(self) -> dict[str, str]:
        """What MLflow records about this part."""
        out = {"source": "hub" if self.repo_id else "local", "folder": str(self.folder)}
        if self.repo_id:
            out |= {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit or ""}
        return out


def looks_like_repo_id(value: str) -> bool:
    """`org/name` or `name`, as the hub spells them; a path with ./, ../, / or ~ is a path."""
    return bool(_REPO_ID.match(value)) and not value.startswith((".", "~")) and ".." not in value


def resolve(value: str, revision: str | None = None, flag: str = "--model.llm-path") -> Resolved:
    """The folder behind a --model.*-path value. PretrainedNotFound (one line) when there is none."""
    return _resolve(str(value), revision, flag)


def local_folder(value: str, revision: str | None = None) -> str:
    return str(resolve(value, revision).folder)


@functools.lru_cache(maxsize=None)
def _resolve(value: str, revision: str | None, flag: str) -> Resolved:
    path = Path(value).expanduser()
    if path.is_dir():
        if revision is not None:
            raise PretrainedNotFound(f"{flag.replace('-path', '-revision')} {revision}: {value} is a local folder; "
                                     "a revision pins hub names only")
        return Resolved(value, path)
    if not looks_like_repo_id(value):
        raise PretrainedNotFound(f"{flag} {value}: no such folder (nor a hub name such as org/model)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(value, revision=revision, allow_patterns=list(ALLOW_PATTERNS)))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as err:
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
        why = ("HF_HUB_OFFLINE=1: nothing is downloaded" if constants.HF_HUB_OFFLINE
               else f"the hub did not answer: {type(err).__name__}")
        pin = f" at revision {revision}" if revision else ""
        raise PretrainedNotFound(f"{flag} {value}: no such folder, and not in {where}{pin} ({why}); fetch it "
                                 f"once with `hf download {value}` where the hub is reachable, or give a folder") from None
    return Resolved(value, folder, value, revision, folder.name)


def pretrained_sources(m) -> dict[str, Resolved]:
    """The resolved pretrained folders of a ModelConfig (llm, whisper, tokenizer), for MLflow."""
    out = {}
    if m.llm_path:
        out["llm"] = resolve(m.llm_path, m.llm_revision, "--model.llm-path")
    if m.whisper_path and m.uses_audio:
        out["whisper"] = resolve(m.whisper_path, m.whisper_revision, "--model.whisper-path")
    if m.tokenizer_path:
        out["tokenizer"] = resolve(m.tokenizer_path, None, "--model.tokenizer-path")
    return out


def clear_cache() -> None:
    """Forget earlier resolutions (a process that changes HF_HUB_CACHE or HF_HUB_OFFLINE)."""
    _resolve.cache_clear()
