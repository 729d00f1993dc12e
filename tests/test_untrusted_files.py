"""Files someone gave you cannot run code: every load the project does is weights_only=True or safetensors.

Each case plants a pickle whose unpickling would `touch` a marker file, proves that plain pickle
would run it, then shows the project's loader refuses it (or ignores the planted object) and the
marker never appears. The resume path (rng_rank*.pt and DeepSpeed's own files in a real checkpoint)
is covered in tests/e2e/test_checkpoint_faults.py.
"""
import pickle

import pytest
import torch

from tests.support.untrusted import RunsCode


def _really_runs_code(tmp_path):
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.exists()


def test_avhubert_checkpoint_with_a_planted_object_loads_only_its_tensors(tmp_path):
    import argparse

    from trainer.model.avhubert import read_official_checkpoint
    _really_runs_code(tmp_path)
    marker = tmp_path / "pwned"
    weights = {"encoder.layers.0.fc1.weight": torch.randn(3, 2)}
    path = tmp_path / "avhubert.pt"
    # what fairseq writes (its config objects) plus a planted object
    torch.save({"model": weights, "args": argparse.Namespace(arch="av_hubert"), "cfg": {"task": "x"}}, path)
    state = read_official_checkpoint(path).state       # fairseq's config objects: inert, tensors loaded
    assert torch.equal(state["encoder.layers.0.fc1.weight"], weights["encoder.layers.0.fc1.weight"])
    torch.save({"model": weights, "args": argparse.Namespace(arch="av_hubert"), "cfg": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="refused, it would run code"):
        read_official_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_pickles_are_checked_with_weights_only(tmp_path):
    from trainer.engine.checkpoint import safe_load, unsafe_pickle
    marker = tmp_path / "pwned"
    path = tmp_path / "rng_rank0.pt"
    torch.save({"rng": RunsCode(marker)}, path)
    assert "refused: not loadable with weights_only=True" in unsafe_pickle(path)
    with pytest.raises(pickle.UnpicklingError):
        safe_load(path)
    assert not marker.exists()


def test_analyze_sinks_refuses_a_planted_state_dict(tmp_path):
    """`--checkpoint some.pt` (a state dict someone sent): refused with one error, no code run."""
    from trainer.run_folder.load import WeightsSource, read_state_dict
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"llm.w": RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        read_state_dict(WeightsSource("consolidated", path, None, None))
    assert not marker.exists()


def test_deepspeed_checkpoint_engine_is_made_weights_only(tmp_path):
    """DeepSpeed's TorchCheckpointEngine.load unpickles with weights_only=False; the trainer switches it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from trainer.engine.checkpoint import weights_only_loads
    marker = tmp_path / "pwned"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, path)
    engine = TorchCheckpointEngine()
    weights_only_loads(engine)
    with pytest.raises(pickle.UnpicklingError):
        engine.load(str(path), map_location="cpu")
    assert not marker.exists()
    torch.save({"optimizer_state_dict": {"state": {0: torch.ones(2)}}}, path)
    loaded = engine.load(str(path), map_location="cpu")
    assert torch.equal(loaded["optimizer_state_dict"]["state"][0], torch.ones(2))
