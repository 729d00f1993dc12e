"""DataConfig validation: bad values fail at construction with a message naming the field."""
import pytest

from trainer.data import DataConfig, build_eval_loader, build_train_loader
from trainer.model.config import ModelConfig

STREAMS = ModelConfig().streams()          # what the default (tiny, avsr) model reads


def test_defaults_construct_and_the_streams_come_from_the_model():
    assert DataConfig().crop_size == 88
    assert (STREAMS.audio, STREAMS.video, STREAMS.n_mels) == (True, True, 80)
    asr, vsr = ModelConfig(modality="asr").streams(), ModelConfig(modality="vsr").streams()
    assert (asr.audio, asr.video, vsr.audio, vsr.video) == (True, False, False, True)
    assert ModelConfig(modality="asr").streams(n_mels=128).n_mels == 128       # a pretrained Whisper's bins


@pytest.mark.parametrize("kw,msg", [
    ({"noise": "pink"}, "--data.noise must be one of"),
    ({"max_frames_per_batch": 100}, r"--data.max-clip-frames \(600\) must be <= --data.max-frames-per-batch \(100\)"),
    ({"num_workers": -1}, "--data.num-workers must be an int >= 0"),
    ({"max_batch_size": 0}, "--data.max-batch-size must be an int >= 1"),
    ({"noise_prob": 1.5}, r"--data.noise-prob must be in \[0, 1\]"),
    ({"train_split": "val"}, "--data.train-split 'val' must differ"),
    ({"min_clip_frames": 700}, "--data.min-clip-frames"),
])
def test_invalid_values_are_rejected_clearly(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DataConfig(shard_dir="x", **kw)


def test_loaders_need_a_shard_dir(tmp_path):
    with pytest.raises(ValueError, match="shard_dir is not set"):
        build_train_loader(DataConfig(shard_dir=""), STREAMS, 0, 1)
    with pytest.raises(FileNotFoundError, match="no shard index for split 'train'"):
        build_train_loader(DataConfig(shard_dir=str(tmp_path)), STREAMS, 0, 1)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        build_eval_loader(DataConfig(shard_dir="x"), STREAMS, "val", 2, 2)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as err:
        DataConfig(shard_dir="x", num_workers=-1, noise="pink", crop_size=0)
    message = str(err.value)
    assert all(f in message for f in ("--data.num-workers", "--data.noise", "--data.crop-size")), message


def test_eval_batches_have_their_own_budget():
    from trainer.data.config import DataConfig
    from trainer.data.pipeline import batch_budget

    same = DataConfig(max_frames_per_batch=400, max_batch_size=8, max_clip_frames=150)
    assert batch_budget(same, train=True) == batch_budget(same, train=False) == (400, 8)
    big = DataConfig(max_frames_per_batch=400, max_batch_size=8, max_clip_frames=150,
                     eval_max_frames_per_batch=4800, eval_max_batch_size=32)
    assert batch_budget(big, train=True) == (400, 8) and batch_budget(big, train=False) == (4800, 32)
    with pytest.raises(ValueError, match="--data.eval-max-frames-per-batch"):
        DataConfig(max_frames_per_batch=400, max_clip_frames=150, eval_max_frames_per_batch=100)
    with pytest.raises(ValueError, match="--data.eval-max-batch-size must be an int >= 1"):
        DataConfig(eval_max_batch_size=0)
