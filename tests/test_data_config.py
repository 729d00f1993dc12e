"""DataConfig validation: bad values fail at construction with a message naming the field."""
import pytest

from trainer.data import DataConfig, build_eval_loader, build_train_loader


def test_defaults_construct_and_modality_flags():
    cfg = DataConfig()
    assert cfg.use_audio and cfg.use_video and cfg.crop_size == 88 and cfg.n_mels == 80
    assert DataConfig(modality="asr").use_video is False and DataConfig(modality="vsr").use_audio is False


@pytest.mark.parametrize("kw,msg", [
    ({"modality": "lip"}, "modality must be one of"),
    ({"noise": "pink"}, "noise must be one of"),
    ({"max_frames_per_batch": 100}, r"max_clip_frames \(600\) must be <= max_frames_per_batch \(100\)"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
    ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
    ({"noise_prob": 1.5}, r"noise_prob must be in \[0, 1\]"),
    ({"train_split": "val"}, "train_split 'val' must differ"),
    ({"min_clip_frames": 700}, "min_clip_frames"),
])
def test_invalid_values_are_rejected_clearly(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DataConfig(shard_dir="x", **kw)


def test_loaders_need_a_shard_dir(tmp_path):
    with pytest.raises(ValueError, match="shard_dir is not set"):
        build_train_loader(DataConfig(shard_dir=""), 0, 1)
    with pytest.raises(FileNotFoundError, match="no shard index for split 'train'"):
        build_train_loader(DataConfig(shard_dir=str(tmp_path)), 0, 1)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        build_eval_loader(DataConfig(shard_dir="x"), "val", 2, 2)
