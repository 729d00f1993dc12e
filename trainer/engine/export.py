"""Exports for use outside the trainer, gathered correctly under ZeRO-3.

Under ZeRO-3 each rank holds a slice of every parameter, so a plain state_dict or
peft `save_pretrained` writes empty tensors. The trainable parameters (LoRA,
projectors, new token rows) are small: gather them on every rank, write on rank 0.
"""
from __future__ import annotations

import logging
from pathlib import Path

from trainer import distributed

log = logging.getLogger(__name__)

CONSOLIDATED = "model.safetensors"
KIND_KEY = "avsr_export"          # safetensors metadata: "consolidated" or "trainable"


def _gathered(params):
    import deepspeed
    zero3 = [p for p in params if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None, enabled=bool(zero3))


def export_trainable(model, out_dir: str | Path, rank: int) -> dict[str, Path]:
    """LoRA adapters in peft format (`adapters/`) and every trainable weight (`trainable.safetensors`), plus
    the delimiter rows even when frozen (--model.freeze-delimiters): using the export needs them."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    trainable = {n: p for n, p in model.named_parameters()
                 if p.requires_grad or n.startswith("delimiter_embeddings.")}
    written: dict[str, Path] = {}
    with _gathered(list(trainable.values())):
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable.items()}
            empty = [n for n, t in tensors.items() if t.numel() == 0]
            if empty:
                raise RuntimeError(f"export gathered empty tensors for {empty[:5]}: ZeRO-3 gathering failed")
            save_file(tensors, str(out_dir / "trainable.safetensors"), metadata={KIND_KEY: "trainable"})
            written["trainable"] = out_dir / "trainable.safetensors"
            # reads the gathered LoRA weights. Not the embedding tables: peft would add them for a resized
            # vocabulary ("auto"), but they are frozen and partitioned (written empty under ZeRO-3), the
            # new rows are a deterministic mean and the delimiter rows are in trainable.safetensors, so
            # the adapters load onto the plain base model (docs/exports.md).
            model.llm.save_pretrained(str(out_dir / "adapters"), safe_serialization=True,
                                      save_embedding_layers=False)
            written["adapters"] = out_dir / "adapters"
    distributed.barrier()
    return written


def _unshared(tensors: dict) -> dict:
    """safetensors refuses tensors that share storage (tied embeddings): copy the second and later ones."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def export_consolidated(ds_engine, out_dir: str | Path) -> Path | None:
    """The whole model (frozen parts included) as one 16-bit/fp32 safetensors file, for evaluation.

    Safetensors, not a pickle: the file can be given to anyone and loading it runs no code. All ranks
    must call this (ZeRO-3 gathers the partitions)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if ds_engine.zero_optimization_partition_weights():
        if not ds_engine.zero_gather_16bit_weights_on_model_save():
            log.warning("consolidated export skipped: set "
                        "zero_optimization.stage3_gather_16bit_weights_on_model_save")
            return None
        state = ds_engine._zero3_consolidated_16bit_state_dict()     # every rank takes part; rank 0 gets it
    else:
        state = ds_engine.module_state_dict()
    path = out_dir / CONSOLIDATED
    if distributed.is_rank_zero():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(_unshared(state), str(tmp), metadata={KIND_KEY: "consolidated"})
        tmp.replace(path)
    distributed.barrier()
    return path
