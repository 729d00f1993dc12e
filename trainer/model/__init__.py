"""Llama-AVSR model: Whisper / AV-HuBERT encoders, projectors, prompt assembly, LoRA LLM, decoding.

Public API (imported lazily, so `trainer.model.roles` stays light):
    ModelConfig, build_model(cfg, ds_config=None) -> LlamaAVSR, AVSROutput, AssembledInputs,
    error_counts / ErrorCounts / normalize_text (metrics).
"""
from importlib import import_module

_EXPORTS = {
    "ModelConfig": "config",
    "build_model": "avsr",
    "llm_hidden_size": "llm",
    "LlamaAVSR": "avsr",
    "AVSROutput": "avsr",
    "AssembledInputs": "prompt",
    "ErrorCounts": "metrics",
    "error_counts": "metrics",
    "normalize_text": "metrics",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
