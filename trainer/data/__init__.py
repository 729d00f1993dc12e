"""Streaming audio-visual data: WebDataset shards -> decoded, batched tensors.

Public API: DataConfig, Streams, build_train_loader, build_eval_loader, train_batches_per_epoch,
SkipCounter, UnusableDataError, log_mel; the batch schema is in trainer.data.batching.
Imported lazily so that `trainer.data.shard_format` (used by the corpus tools) stays free of torch/decord.
"""
from importlib import import_module

_EXPORTS = {
    "DataConfig": "config", "Streams": "config", "build_train_loader": "pipeline", "build_eval_loader": "pipeline",
    "train_batches_per_epoch": "pipeline", "SkipCounter": "skips", "UnusableDataError": "skips",
    "log_mel": "features",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
