"""Load a DeepSpeed JSON and fill its "auto" values.

HF Trainer and Accelerate resolve "auto" for their users; a plain `deepspeed`
launch does not, so the trainer does it here from the model width and the
experiment config. Values the user wrote explicitly are kept, and a mismatch
between an explicit value and the experiment config is an error, not a surprise.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

AUTO = "auto"


class DeepSpeedConfigError(ValueError):
    pass


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist (see ds_configs/ for examples)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from err


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(section: dict, key: str, value: Any, *, what: str) -> None:
    """Fill `auto`; if the user wrote a value, require it to agree with the experiment config."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif value is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and float(current) != float(value):
        raise DeepSpeedConfigError(
            f"DeepSpeed config sets {what}={current!r} but the experiment config implies {value!r}; "
            f"set it to \"auto\" in the JSON or change the experiment option")


def resolve_ds_config(raw: dict, *, hidden_size: int, micro_batch_size: int, grad_accum: int,
                      grad_clip: float, lr: float, weight_decay: float, total_steps: int,
                      warmup_steps: int, min_lr_ratio: float, bf16: bool, on_cpu: bool) -> dict:
    """Return a copy of `raw` with every "auto" replaced. Raises on anything left unresolved."""
    cfg = copy.deepcopy(raw)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, what="train_micro_batch_size_per_gpu")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, what="gradient_accumulation_steps")
    _fill(cfg, "gradient_clipping", grad_clip, what="gradient_clipping")
    if cfg.get("train_batch_size") == AUTO:
        del cfg["train_batch_size"]          # DeepSpeed derives it from the two above and the world size

    bf16_section = cfg.setdefault("bf16", {})
    if bf16_section.get("enabled", False) == AUTO:
        bf16_section["enabled"] = bool(bf16)
    if cfg.get("fp16", {}).get("enabled") == AUTO:
        cfg["fp16"]["enabled"] = False       # bf16 or fp32 only: fp16 loss scaling is not worth it here
    if on_cpu and bf16_section.get("enabled"):
        raise DeepSpeedConfigError("bf16 is enabled in the DeepSpeed config but there is no GPU; use \"auto\"")

    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", lr, what="optimizer.params.lr")
        _fill(params, "weight_decay", weight_decay, what="optimizer.params.weight_decay")
        # DeepSpeed's fused/CPU Adam ops are compiled on first use; on a CPU-only machine
        # plain torch AdamW avoids the compile and is as fast for LoRA-sized parameters.
        if on_cpu and str(opt.get("type", "")).lower() in ("adam", "adamw") and "torch_adam" not in params \
                and not _offloads_optimizer(cfg):
            params["torch_adam"] = True

    sched = cfg.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        kind = sched.get("type")
        if kind == "WarmupCosineLR":
            _fill(params, "total_num_steps", total_steps, what="scheduler.params.total_num_steps")
            _fill(params, "warmup_num_steps", warmup_steps, what="scheduler.params.warmup_num_steps")
            _fill(params, "cos_min_ratio", min_lr_ratio, what="scheduler.params.cos_min_ratio")
        elif kind in ("WarmupLR", "WarmupDecayLR"):
            _fill(params, "warmup_num_steps", warmup_steps, what="scheduler.params.warmup_num_steps")
            _fill(params, "warmup_max_lr", lr, what="scheduler.params.warmup_max_lr")
            _fill(params, "warmup_min_lr", 0.0, what="scheduler.params.warmup_min_lr")
            if kind == "WarmupDecayLR":
                _fill(params, "total_num_steps", total_steps, what="scheduler.params.total_num_steps")

    zero = cfg.get("zero_optimization", {})
    h = hidden_size
    # The values HF's integration uses for "auto" (DeepSpeed's docs recommend the same scale).
    _fill(zero, "reduce_bucket_size", h * h, what="zero_optimization.reduce_bucket_size")
    if "allgather_bucket_size" in zero:
        _fill(zero, "allgather_bucket_size", h * h, what="zero_optimization.allgather_bucket_size")
    if zero_stage(cfg) == 3:
        _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h), what="stage3_prefetch_bucket_size")
        _fill(zero, "stage3_param_persistence_threshold", 10 * h, what="stage3_param_persistence_threshold")

    left = list(_find_auto(cfg))
    if left:
        raise DeepSpeedConfigError(f"DeepSpeed config still has \"auto\" at {left}; the trainer cannot fill these")
    return cfg


def _offloads_optimizer(cfg: dict) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer", {})
    return off.get("device", "none") not in ("none", None)


def _find_auto(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _find_auto(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _find_auto(v, f"{path}[{i}]")
    elif node == AUTO:
        yield path
