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


def _default(section: dict, key: str, value: Any) -> None:
    """Fill `auto` with a sizing default; a number the user wrote is their tuning, not a contradiction
    of the experiment config, and is kept (as HF's integration does for these keys)."""
    if section.get(key, AUTO) == AUTO:
        section[key] = value


def use_bf16(precision: str, raw: dict, *, on_cpu: bool, bf16_supported: bool) -> bool:
    """Whether the run trains in bf16: --train.precision, or with "auto" the JSON's explicit
    `bf16.enabled`, else bf16 on a GPU that has it and fp32 on CPU (where bf16 runs, tested, but
    slower than fp32). An explicit precision that the JSON contradicts is an error."""
    written = raw.get("bf16", {}).get("enabled", AUTO) if isinstance(raw.get("bf16"), dict) else AUTO
    if precision != "auto" and written != AUTO and bool(written) != (precision == "bf16"):
        raise DeepSpeedConfigError(
            f"--train.precision {precision} but the DeepSpeed config sets bf16.enabled={written}; "
            f"set it to \"auto\" in the JSON or change --train.precision")
    if precision == "auto":
        bf16 = bool(written) if written != AUTO else (not on_cpu and bf16_supported)
    else:
        bf16 = precision == "bf16"
    if bf16 and not on_cpu and not bf16_supported:
        raise DeepSpeedConfigError("bf16 asked for (--train.precision or the DeepSpeed JSON) but this GPU has "
                                   "no bf16 support; use --train.precision fp32")
    return bf16


def op_prebuilt(name: str) -> bool:
    """Whether DeepSpeed's op `name` was compiled into the installed package (DS_BUILD_*=1 at install):
    only then does using it need no compiler at start."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(name, False))


def choose_adam(cfg: dict, *, on_cpu: bool, fused_adam_prebuilt: bool) -> None:
    """Pick the Adam DeepSpeed builds so that nothing compiles inside deepspeed.initialize unless the
    JSON asks for it. DeepSpeed's FusedAdam is JIT-compiled on first use (nvcc needed, with torch's CUDA
    major), its CPU Adam likewise; torch's AdamW needs no compiler, and on CUDA its fused kernel is one
    launch per step. So: an explicit "torch_adam" is kept; with an offloaded optimizer DeepSpeed's CPU
    Adam stays (ZeRO-Offload needs it); on a GPU, FusedAdam when its op is prebuilt, else torch's fused
    AdamW; on CPU, torch's AdamW."""
    opt = cfg.get("optimizer")
    if opt is None or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        return
    params = opt.setdefault("params", {})
    if "torch_adam" in params or offloads_optimizer(cfg):
        if params.get("torch_adam") and not on_cpu:
            params.setdefault("fused", True)
        return
    if on_cpu:
        params["torch_adam"] = True
    elif not fused_adam_prebuilt:
        params["torch_adam"] = True
        params["fused"] = True


def describe_optimizer(cfg: dict) -> str:
    """The optimizer a resolved config makes DeepSpeed build, in words (logged at start)."""
    opt = cfg.get("optimizer")
    if opt is None:
        return "none in the DeepSpeed JSON (the client's)"
    params = opt.get("params", {})
    kind = str(opt.get("type"))
    if kind.lower() not in ("adam", "adamw"):
        return f"DeepSpeed {kind}"
    if params.get("torch_adam"):
        return f"torch.optim.AdamW{' (fused)' if params.get('fused') else ''}: no compiled op"
    if offloads_optimizer(cfg):
        return "DeepSpeed CPU Adam (ZeRO-Offload; op cpu_adam, JIT-compiled unless prebuilt)"
    return "DeepSpeed FusedAdam (op fused_adam, JIT-compiled unless prebuilt)"


def resolve_ds_config(raw: dict, *, hidden_size: int, micro_batch_size: int, grad_accum: int,
                      grad_clip: float, lr: float, weight_decay: float, total_steps: int,
                      warmup_steps: int, min_lr_ratio: float, bf16: bool, on_cpu: bool,
                      fused_adam_prebuilt: bool = False) -> dict:
    """Return a copy of `raw` with every "auto" replaced. Raises on anything left unresolved."""
    cfg = copy.deepcopy(raw)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, what="train_micro_batch_size_per_gpu")
    _fill(cfg, "gradient_accumulation_steps", grad_accum, what="gradient_accumulation_steps")
    _fill(cfg, "gradient_clipping", grad_clip, what="gradient_clipping")
    if cfg.get("train_batch_size") == AUTO:
        del cfg["train_batch_size"]          # DeepSpeed derives it from the two above and the world size

    bf16_section = cfg.setdefault("bf16", {})
    if bf16_section.get("enabled", AUTO) == AUTO:
        bf16_section["enabled"] = bool(bf16)
    elif bool(bf16_section["enabled"]) != bool(bf16):
        raise DeepSpeedConfigError(f"DeepSpeed config sets bf16.enabled={bf16_section['enabled']} but the run "
                                   f"trains in {'bf16' if bf16 else 'fp32'} (see use_bf16)")
    if cfg.get("fp16", {}).get("enabled") == AUTO:
        cfg["fp16"]["enabled"] = False       # bf16 or fp32 only: fp16 loss scaling is not worth it here

    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", lr, what="optimizer.params.lr")
        _fill(params, "weight_decay", weight_decay, what="optimizer.params.weight_decay")
    choose_adam(cfg, on_cpu=on_cpu, fused_adam_prebuilt=fused_adam_prebuilt)

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
    _default(zero, "reduce_bucket_size", h * h)
    if "allgather_bucket_size" in zero:
        _default(zero, "allgather_bucket_size", h * h)
    if zero_stage(cfg) == 3:
        _default(zero, "stage3_prefetch_bucket_size", int(0.9 * h * h))
        _default(zero, "stage3_param_persistence_threshold", 10 * h)

    left = list(_find_auto(cfg))
    if left:
        raise DeepSpeedConfigError(f"DeepSpeed config still has \"auto\" at {left}; the trainer cannot fill these")
    return cfg


def offloads_optimizer(cfg: dict) -> bool:
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


# ---- checks before any process group starts (launch/train.py's parse step) --------------------------
# DeepSpeed reads the keys it knows and ignores the rest, so a misspelt key is silently a default. These are
# the top-level keys DeepSpeed 0.16-0.19 reads (runtime/config.py and the sections it delegates to).
TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "memory_breakdown", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp",
    "torch_autocast", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
    "communication_data_type", "seq_parallel_communication_data_type", "data_types", "compile", "checkpoint",
    "aio", "elasticity", "autotuning", "compression_training", "data_efficiency", "curriculum_learning",
    "progressive_layer_drop", "eigenvalue", "quantize_training", "weight_quantization", "sparse_attention",
    "pipeline", "pipeline_parallel_size", "nebula", "hybrid_engine", "timers", "dataloader_drop_last",
    "use_node_local_storage", "load_universal_checkpoint", "graph_harvesting", "disable_allgather",
    "mics_shard_size", "mics_hierarchical_params_gather", "zero_quantized_weights", "zero_quantized_gradients",
    "tensor_parallel", "gradient_accumulation_dtype", "use_data_before_expert_parallel_", "fp8",
    "data_sampling", "monitor_config", "expert_parallel_size", "domino", "compiled_autograd", "sequence_parallel_size",
})
ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# zero_optimization sizes: the smallest value DeepSpeed takes (a bucket of 0 elements never fills)
ZERO_SIZES = {"reduce_bucket_size": 1, "allgather_bucket_size": 1, "stage3_prefetch_bucket_size": 0,
              "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
              "stage3_max_reuse_distance": 0, "sub_group_size": 0}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def check_ds_config(raw: Any, *, micro_batch_size: int, grad_accum: int, world_size: int) -> list[str]:
    """The problems DeepSpeed would find only after the process group, the model and the tokenizer exist
    (or would never report: a misspelt key), found from the JSON alone. `micro_batch_size`, `grad_accum`
    and `world_size` are what the experiment config and the launcher imply. Empty: nothing found."""
    from trainer.config_checks import close_names

    if not isinstance(raw, dict):
        return ["must be a JSON object (see ds_configs/)"]
    found = []
    for key in sorted(set(raw) - TOP_LEVEL_KEYS):
        meant = close_names(key, TOP_LEVEL_KEYS)
        found.append(f"unknown key {key!r}" + (f" (did you mean {' or '.join(meant)}?)" if meant else
                                               " (DeepSpeed would ignore it)"))
    found += _check_batch(raw, micro_batch_size, grad_accum, world_size)
    clip = raw.get("gradient_clipping", AUTO)
    if clip != AUTO and not (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip >= 0):
        found.append(f"gradient_clipping is {clip!r}; a number >= 0 or \"auto\" is accepted")
    zero = raw.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return found + [f"zero_optimization is {zero!r}; a JSON object with a \"stage\" is accepted"]
    found += _check_zero(zero)
    if not found and zero:
        found += _check_zero_with_deepspeed(zero)
    return found


def _check_batch(raw: dict, micro: int, accum: int, world: int) -> list[str]:
    found = []
    for key, implied, flag in (("train_micro_batch_size_per_gpu", micro, "--data.max-batch-size"),
                               ("gradient_accumulation_steps", accum, "--train.grad-accum")):
        value = raw.get(key, AUTO)
        if value == AUTO:
            continue
        if not _is_int(value) or value < 1:
            found.append(f"{key} is {value!r}; an int >= 1 or \"auto\" is accepted")
        elif value != implied:
            found.append(f"{key} is {value} but {flag} is {implied}: set it to \"auto\" or change {flag}")
    total = raw.get("train_batch_size", AUTO)
    if total != AUTO:
        product = micro * accum * world
        if not _is_int(total) or total < 1:
            found.append(f"train_batch_size is {total!r}; an int >= 1 or \"auto\" is accepted")
        elif total != product:
            found.append(f"train_batch_size is {total} but micro batch ({micro}) x gradient accumulation ({accum}) "
                         f"x world size ({world}) = {product}: set it to \"auto\" (or {product})")
    return found


def _check_zero(zero: dict) -> list[str]:
    found = []
    stage = zero.get("stage", 0)
    if not (_is_int(stage) and stage in ZERO_STAGES):
        found.append(f"zero_optimization.stage is {stage!r}; DeepSpeed accepts 0, 1, 2 or 3")
    for key, low in ZERO_SIZES.items():
        value = zero.get(key, AUTO)
        if value != AUTO and not (_is_int(value) and value >= low):
            found.append(f"zero_optimization.{key} is {value!r}; an int >= {low} or \"auto\" is accepted")
    for key, stages in (("offload_optimizer", (1, 2, 3)), ("offload_param", (3,))):
        off = zero.get(key)
        if off is None:
            continue
        device = off.get("device", "none") if isinstance(off, dict) else off
        if not isinstance(off, dict) or device not in OFFLOAD_DEVICES:
            found.append(f"zero_optimization.{key}.device is {device!r}; one of {OFFLOAD_DEVICES} is accepted")
        elif device != "none" and stage in ZERO_STAGES and stage not in stages:
            found.append(f"zero_optimization.{key} needs stage {' or '.join(map(str, stages))}, the JSON has {stage}")
        elif device == "nvme" and not off.get("nvme_path"):
            found.append(f"zero_optimization.{key}.device is \"nvme\" without an nvme_path (a folder on the NVMe disk)")
    return found


def _check_zero_with_deepspeed(zero: dict) -> list[str]:
    """DeepSpeed's own model of the section (unknown keys, types, ranges), once the cheap checks pass: it
    costs DeepSpeed's import. "auto" values are the trainer's to fill, so they are left out here."""
    from pydantic import ValidationError
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from trainer.config_checks import close_names

    given = {k: v for k, v in zero.items() if v != AUTO}
    try:
        DeepSpeedZeroConfig(**given)
    except ValidationError as err:
        known = set(DeepSpeedZeroConfig.model_fields)
        known |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
        found = []
        for e in err.errors():
            where = "zero_optimization." + ".".join(map(str, e["loc"]))
            if e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
                meant = close_names(str(e["loc"][0]), known)
                found.append(f"unknown key {where}" + (f" (did you mean {' or '.join(meant)}?)" if meant else ""))
            else:
                found.append(f"{where} is {e.get('input')!r}: DeepSpeed says: {e['msg']}")
        return found
    devices = {k: zero[k].get("device") for k in ("offload_optimizer", "offload_param") if isinstance(zero.get(k), dict)}
    if "nvme" in devices.values():
        from deepspeed.ops.op_builder import AsyncIOBuilder
        if not AsyncIOBuilder().is_compatible(verbose=False):
            return ["offload to \"nvme\" needs DeepSpeed's async_io op, which cannot be built here "
                    "(libaio missing); use \"cpu\" or install libaio-dev"]
    return []
