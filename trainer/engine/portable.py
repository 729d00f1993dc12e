"""The world-size-independent copy of what training changes, written into every checkpoint.

DeepSpeed's ZeRO files are cut per rank (and its universal-checkpoint conversion is an offline step
whose loader unpickles with weights_only=False), so a checkpoint of N ranks cannot be loaded by M.
What this trainer trains is small (LoRA, projectors, delimiter rows), so each checkpoint also holds,
per parameter name, the full fp32 master weight and Adam moments, the module buffers
(`portable/state.safetensors`), and the optimizer step, the param groups (lr, ...), the lr schedule,
the engine's counters and the data position (`portable/state.json`). Resuming on another world
size loads these instead of DeepSpeed's files: model, optimizer and schedule carry over exactly.
Nothing here is a pickle; the checkpoint's manifest covers both files like any other.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer import distributed

FOLDER = "portable"
TENSORS = "state.safetensors"
META = "state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _base_optimizer(ds_engine):
    """The torch optimizer under DeepSpeed's ZeRO wrapper (it holds the param groups and Adam's step)."""
    return getattr(ds_engine.optimizer, "optimizer", ds_engine.optimizer)


def _adam_step(optimizer) -> int:
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    steps += [int(g["step"]) for g in optimizer.param_groups if "step" in g]
    return max(steps, default=0)


def save(ds_engine, folder: Path, rank: int, data_state: dict) -> None:
    """Collective (the gathers): every rank calls it; rank 0 writes portable/ under `folder`."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(ds_engine.module):
        tensors[f"param/{name}"] = safe_get_full_fp32_param(p)
        for key in MOMENTS:
            tensors[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key)
    for name, b in ds_engine.module.named_buffers():
        tensors[f"buffer/{name}"] = b
    if rank != 0:
        return
    opt = _base_optimizer(ds_engine)
    sched = ds_engine.lr_scheduler
    meta = {"adam_step": _adam_step(opt),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "lr_scheduler": sched.state_dict() if sched is not None else None,
            "engine": {"global_steps": ds_engine.global_steps, "global_samples": ds_engine.global_samples,
                       "skipped_steps": ds_engine.skipped_steps},
            "data": data_state, "world_size": distributed.world_size()}
    out = folder / FOLDER
    out.mkdir(parents=True, exist_ok=True)
    # masters and moments come gathered in fp32; buffers keep their dtype
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / TENSORS))
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")


def present(folder: Path) -> bool:
    return (folder / FOLDER / TENSORS).is_file() and (folder / FOLDER / META).is_file()


def read_meta(folder: Path) -> dict:
    return json.loads((folder / FOLDER / META).read_text())


@torch.no_grad()
def load(ds_engine, folder: Path) -> dict:
    """Every rank: put the saved full state into this world size's partitions. Returns state.json."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    tensors = load_file(str(folder / FOLDER / TENSORS), device="cpu")
    meta = read_meta(folder)
    module = ds_engine.module
    names = [n for n, _ in _trainable(module)]
    missing = [n for n in names if f"param/{n}" not in tensors]
    if missing:
        raise RuntimeError(f"{folder / FOLDER / TENSORS} lacks trainable parameters {missing[:3]} "
                           f"(of {len(missing)}): it was written for another model")
    opt = _base_optimizer(ds_engine)
    _ensure_adam_state(opt, getattr(ds_engine.optimizer, "fp32_partitioned_groups_flat", None))
    if hasattr(ds_engine.optimizer, "_lazy_init_hp_params_optimizer_state"):   # ZeRO-1/2: link the new moments
        ds_engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in _trainable(module):
        device = p.device
        safe_set_full_fp32_param(p, tensors[f"param/{name}"].to(device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(device), key)
    for name, b in module.named_buffers():
        if f"buffer/{name}" in tensors:
            b.copy_(tensors[f"buffer/{name}"])
    _master_to_model(ds_engine.optimizer)
    for group, saved in zip(opt.param_groups, meta["param_groups"]):
        group.update(saved)
    for state in opt.state.values():
        if "step" in state:
            state["step"] = (torch.tensor(float(meta["adam_step"])) if torch.is_tensor(state["step"])
                             else meta["adam_step"])
    if meta["lr_scheduler"] is not None and ds_engine.lr_scheduler is not None:
        ds_engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    for key, value in meta["engine"].items():
        setattr(ds_engine, key, value)
    return meta


def _ensure_adam_state(optimizer, masters: list | None) -> None:
    """Adam creates its moments at its first step; a fresh engine has none yet to write into. ZeRO-3 puts
    its fp32 partitions (`masters`) into the optimizer's groups only during a step."""
    for p in masters if masters is not None else [p for g in optimizer.param_groups for p in g["params"]]:
        if p.numel():
            state = optimizer.state[p]
            if "exp_avg" not in state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _master_to_model(zero_optimizer) -> None:
    """Copy the fp32 master partitions into the model's (partitioned) parameters, as DeepSpeed's
    universal-checkpoint loaders do."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):          # ZeRO-3
        for fp32, flat in zip(zero_optimizer.fp32_partitioned_groups_flat,
                              zero_optimizer.fp16_partitioned_groups_flat):
            if fp32.numel() and fp32.data_ptr() != flat.data_ptr():
                flat.data.copy_(fp32.data)
        for i, flat in enumerate(zero_optimizer.fp16_partitioned_groups_flat):
            parts = zero_optimizer.fp16_partitioned_groups[i]
            for param, q in zip(parts, zero_optimizer.unflatten(flat, parts)):
                param.data = q.data
        zero_optimizer.checkpoint_event_epilogue()        # persistent (unpartitioned) params regathered
    elif hasattr(zero_optimizer, "update_lp_params"):                    # ZeRO-1/2
        zero_optimizer.update_lp_params()
    else:
        raise RuntimeError(f"resume on another world size supports ZeRO-1/2/3, not {type(zero_optimizer).__name__}")
