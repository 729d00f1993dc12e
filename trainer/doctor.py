"""What this machine offers the trainer, and what the trainer will use on it.

    python -m trainer.doctor                       # report; exit 0 when usable, 1 on a blocking problem
    python -m trainer.doctor --json                # the same, for machines
    python -m trainer.doctor -- --recipe R --train.device cpu    # as the trainer would run with these options
    python -m trainer.doctor --out DIR             # also DIR/doctor-<host>.{txt,json} (the SLURM jobs do)

Reads versions from package metadata and DeepSpeed's build record (git_version_info), never builds or
loads a DeepSpeed op, and never initialises a CUDA context beyond torch's device queries.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.device import (DeviceError, TorchFacts, apply, decide_device, host_facts, required_driver)

PACKAGES = ("torch", "deepspeed", "triton", "transformers", "peft", "accelerate", "mlflow", "webdataset",
            "safetensors", "tyro")
DS_OPS = ("fused_adam", "cpu_adam")     # the optimizers' ops: prebuilt, or JIT-compiled on first use


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _major(version: str | None) -> int | None:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


def nvcc_version() -> tuple[str | None, str | None]:
    """(path, CUDA release "12.4") of the nvcc DeepSpeed's JIT would use (CUDA_HOME first, then PATH)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    exe = str(Path(home) / "bin" / "nvcc") if home and (Path(home) / "bin" / "nvcc").exists() else shutil.which("nvcc")
    if not exe:
        return None, None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return exe, None
    m = re.search(r"release (\d+\.\d+)", out)
    return exe, m.group(1) if m else None


def cpu_bf16_flags() -> list[str]:
    try:
        flags = set(re.findall(r"\S+", next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                                             if line.startswith("flags"))))
    except (OSError, StopIteration):
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f"})


def triton_backend() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter (TRITON_INTERPRET=1)"
    try:
        from triton.runtime import driver
        return f"{type(driver.active).__name__}"
    except Exception as err:    # triton raises RuntimeError("0 active drivers") without a GPU
        return f"none ({str(err).splitlines()[0]})"


def optimizer_of(ds_cfg: dict) -> tuple[str, bool]:
    """(what the resolved DeepSpeed config trains with, whether it needs DeepSpeed's fused_adam op): the
    trainer's own choice (trainer.engine.ds_config.choose_adam) in its own words."""
    from trainer.engine.ds_config import describe_optimizer, offloads_optimizer

    opt = ds_cfg.get("optimizer") or {}
    needs_fused = (str(opt.get("type", "")).lower() in ("adam", "adamw") and not opt.get("params", {}).get("torch_adam")
                   and not offloads_optimizer(ds_cfg))
    return describe_optimizer(ds_cfg), needs_fused


def collect(trainer_args: list[str]) -> dict[str, Any]:
    """Everything the report says, as a dict; `problems` (blocking) and `warnings` say what is wrong."""
    from trainer.config import ConfigError, parse_args
    from trainer.engine.ds_config import DeepSpeedConfigError, load_ds_config, op_prebuilt, resolve_ds_config, use_bf16

    problems: list[str] = []
    warnings: list[str] = []
    r: dict[str, Any] = {"host": socket.gethostname(), "python": sys.version.split()[0],
                         "platform": platform.platform(), "packages": {p: _version(p) for p in PACKAGES}}
    try:
        cfg = parse_args(trainer_args, check=False)
    except (ConfigError, SystemExit, ValueError) as err:
        problems.append(f"trainer options: {err}")
        from trainer.config import ExperimentConfig
        cfg = ExperimentConfig()

    # ---- torch, CUDA, driver, GPUs -------------------------------------------------------------------
    import torch
    tf = TorchFacts.of_installed()
    host = host_facts()
    r["torch"] = {"version": torch.__version__, "cuda": tf.cuda, "hip": tf.hip,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if tf.cuda else None,
                  "cuda_available": tf.cuda_available(), "driver_needed": required_driver(tf.cuda)}
    r["driver"] = host.driver
    r["gpus_visible_because"] = list(host.visible_because)
    gpus = [{"name": g.name, "memory_mib": g.memory_mib} for g in host.gpus]
    if tf.cuda_available():
        gpus = [{"name": torch.cuda.get_device_name(i),
                 "memory_mib": torch.cuda.get_device_properties(i).total_memory // 2**20,
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                for i in range(torch.cuda.device_count())]
    r["gpus"] = gpus

    # ---- the device decision (the trainer's own), then DeepSpeed under it ----------------------------
    try:
        decision = decide_device(cfg.train.device, os.environ, host, tf)
        apply(decision)
        device = decision.device
        r["device"] = decision.line()
    except DeviceError as err:
        problems.append(str(err))
        device = "cpu"
        r["device"] = f"none ({err})"
        os.environ["DS_ACCELERATOR"] = "cpu"      # only so that DeepSpeed's build record can be read
    on_gpu = device == "cuda"
    try:
        bf16 = use_bf16(cfg.train.precision, load_ds_config(cfg.config), on_cpu=not on_gpu,
                        bf16_supported=not on_gpu or torch.cuda.is_bf16_supported())
    except DeepSpeedConfigError as err:
        problems.append(str(err))
        bf16 = False
    r["bf16"] = {"gpu": torch.cuda.is_bf16_supported() if on_gpu else None, "cpu_flags": cpu_bf16_flags()}
    r["attention"] = {"sdpa": hasattr(torch.nn.functional, "scaled_dot_product_attention"),
                      "flash_sdp_built": torch.backends.cuda.is_flash_attention_available()
                      if hasattr(torch.backends.cuda, "is_flash_attention_available") else None,
                      "flash_attn_package": _version("flash-attn") or _version("flash_attn")}

    nvcc, nvcc_cuda = nvcc_version()
    r["nvcc"] = {"path": nvcc, "cuda": nvcc_cuda, "ninja": shutil.which("ninja")}
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("deepspeed is not installed (pip install deepspeed)")
        ds_info: dict[str, Any] = {}
    else:
        import deepspeed.git_version_info as dsv
        from deepspeed.accelerator import get_accelerator
        ds_info = {"version": dsv.version, "accelerator": get_accelerator().device_name(),
                   "built_for": dsv.accelerator_name if hasattr(dsv, "accelerator_name") else None,
                   "ops": {op: "prebuilt" if dsv.installed_ops.get(op) else "JIT-compiled on first use"
                           for op in DS_OPS}}
    r["deepspeed"] = ds_info

    # ---- what the trainer will use ---------------------------------------------------------------------
    try:
        from trainer.model import llm_hidden_size
        hidden = llm_hidden_size(cfg.model)
    except Exception:       # a model path that is not there (yet): bucket sizes do not change the optimizer
        hidden = 1024
    try:
        ds_cfg = resolve_ds_config(
            load_ds_config(cfg.config), hidden_size=hidden, micro_batch_size=cfg.data.max_batch_size,
            grad_accum=cfg.train.grad_accum, grad_clip=cfg.train.grad_clip, lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay, total_steps=cfg.train.max_steps,
            warmup_steps=cfg.train.warmup_steps, min_lr_ratio=cfg.train.min_lr_ratio, bf16=bf16,
            on_cpu=not on_gpu, fused_adam_prebuilt=op_prebuilt("fused_adam"))
        optimizer, needs_fused_op = optimizer_of(ds_cfg)
    except DeepSpeedConfigError as err:
        problems.append(f"DeepSpeed config {cfg.config}: {err}")
        optimizer, needs_fused_op = "?", False
    r["will_use"] = {"device": device, "precision": "bf16" if bf16 else "fp32", "optimizer": optimizer,
                     "ds_config": cfg.config}

    # ---- what is wrong -----------------------------------------------------------------------------------
    if on_gpu and needs_fused_op and ds_info.get("ops", {}).get("fused_adam") != "prebuilt":
        if not nvcc:
            problems.append("the optimizer is DeepSpeed's FusedAdam, not prebuilt, and there is no nvcc to compile "
                            "it: set \"torch_adam\": true in the DeepSpeed JSON, or install DeepSpeed with "
                            "DS_BUILD_FUSED_ADAM=1")
        elif _major(nvcc_cuda) != _major(tf.cuda):
            problems.append(f"nvcc is CUDA {nvcc_cuda} but torch is built for CUDA {tf.cuda}: DeepSpeed's JIT "
                            f"refuses the mismatch (CUDAMismatchException); use a matching CUDA toolkit or "
                            f"\"torch_adam\": true")
    elif nvcc and nvcc_cuda and tf.cuda and _major(nvcc_cuda) != _major(tf.cuda):
        warnings.append(f"nvcc is CUDA {nvcc_cuda}, torch is built for CUDA {tf.cuda}: DeepSpeed ops cannot be "
                        f"JIT-compiled here (the trainer does not need any as configured)")
    triton = triton_backend()
    r["triton"] = {"version": _version("triton"), "backend": triton}
    if on_gpu and triton.startswith("none"):
        problems.append(f"Triton has no active driver on a GPU run: {triton}")
    if not on_gpu and cfg.train.precision == "bf16" and not r["bf16"]["cpu_flags"]:
        warnings.append("bf16 on a CPU without avx512_bf16/amx_bf16: emulated, slow")
    for pkg in ("torch", "transformers", "peft", "webdataset", "tyro"):
        if r["packages"][pkg] is None:
            problems.append(f"{pkg} is not installed")
    if r["packages"]["mlflow"] is None:
        warnings.append("mlflow is not installed: runs need --tracking.enabled False")
    r["problems"], r["warnings"] = problems, warnings
    r["usable"] = not problems
    return r


def format_report(r: dict[str, Any]) -> str:
    t, ds, w = r["torch"], r["deepspeed"], r["will_use"]
    gpus = "; ".join(f"{g['name']} {g['memory_mib']} MiB" for g in r["gpus"]) or "none"
    lines = [
        f"host {r['host']}: Python {r['python']}, {r['platform']}",
        f"torch {t['version']}: CUDA {t['cuda'] or 'none (CPU-only build)'}, cuDNN {t['cudnn']}, NCCL {t['nccl']}, "
        f"sees a GPU: {t['cuda_available']}",
        f"NVIDIA driver {r['driver'] or 'none'} (torch's CUDA needs >= {t['driver_needed'] or '-'}); "
        f"GPUs: {gpus}" + (f" (visible: {', '.join(r['gpus_visible_because'])})" if r["gpus_visible_because"] else ""),
        f"DeepSpeed {ds.get('version', 'missing')}: accelerator {ds.get('accelerator', '-')}, ops: "
        + (", ".join(f"{k} {v}" for k, v in ds.get("ops", {}).items()) or "-"),
        f"nvcc: {r['nvcc']['path'] or 'none'}" + (f" (CUDA {r['nvcc']['cuda']})" if r["nvcc"]["cuda"] else "")
        + f", ninja: {'yes' if r['nvcc']['ninja'] else 'no'}",
        f"Triton {r['triton']['version']}: {r['triton']['backend']}",
        f"bf16: GPU {r['bf16']['gpu']}, CPU flags {' '.join(r['bf16']['cpu_flags']) or 'none'}; attention: SDPA "
        f"{r['attention']['sdpa']}, flash SDP built {r['attention']['flash_sdp_built']}, flash-attn package "
        f"{r['attention']['flash_attn_package'] or 'no'}",
        "packages: " + ", ".join(f"{k} {v or 'missing'}" for k, v in r["packages"].items()),
        r["device"],
        f"the trainer will use: device {w['device']}, precision {w['precision']}, optimizer {w['optimizer']} "
        f"({w['ds_config']})",
    ]
    lines += [f"PROBLEM: {p}" for p in r["problems"]] + [f"warning: {p}" for p in r["warnings"]]
    lines.append("usable" if r["usable"] else "NOT usable: fix the problems above")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m trainer.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", help="also write DIR/doctor-<host>.txt and .json")
    args = p.parse_args(own)
    report = collect(trainer_args)
    text = format_report(report)
    print(json.dumps(report, indent=1) if args.json else text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"doctor-{report['host']}.txt").write_text(text + "\n")
        (out / f"doctor-{report['host']}.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["usable"] else 1


if __name__ == "__main__":
    sys.exit(main())
