"""Where the run trains (`--train.device auto|cuda|cpu`), decided before DeepSpeed is imported.

DeepSpeed picks its accelerator once, from DS_ACCELERATOR or by probing, and falls back to the CPU
without a word when torch sees no GPU. A GPU job that trains on the CPU is the worst surprise a
cluster user can get (an inherited DS_ACCELERATOR=cpu through sbatch, a CPU-only torch, a driver
older than torch's CUDA), so the trainer decides here, from what the machine shows, and either
tells DeepSpeed (it sets DS_ACCELERATOR) or stops with one line naming the cause.

A bottom-layer module: the standard library and torch only.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, MutableMapping, Optional

log = logging.getLogger("trainer.device")

Requested = Literal["auto", "cuda", "cpu"]
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
DRIVER_FILE = Path("/proc/driver/nvidia/version")
# The oldest Linux driver each CUDA major runs on (NVIDIA's minor-version compatibility; PyTorch's
# wheels bundle their CUDA runtime, so this is what a `pip install torch` needs of the node).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
WHEEL_INDEX = "https://download.pytorch.org/whl/cu128"


class DeviceError(RuntimeError):
    """The run cannot have the device it should: one line, naming the cause and the way out."""


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: Optional[int]
    driver: str


@dataclass(frozen=True)
class HostFacts:
    """What the machine shows about NVIDIA GPUs, without CUDA: nvidia-smi, the driver, the variables."""
    gpus: tuple[Gpu, ...] = ()
    driver: Optional[str] = None               # "550.54.14", from nvidia-smi or /proc/driver/nvidia/version
    visible_because: tuple[str, ...] = ()      # why GPUs count as visible (empty: none)
    hidden: bool = False                       # CUDA_VISIBLE_DEVICES="" or -1: the user hid them


@dataclass(frozen=True)
class TorchFacts:
    version: str
    cuda: Optional[str]                        # torch.version.cuda: None on a CPU-only build
    hip: Optional[str] = None
    cuda_available: Callable[[], bool] = field(default=lambda: False, compare=False)
    device_count: Callable[[], int] = field(default=lambda: 0, compare=False)

    @classmethod
    def of_installed(cls) -> "TorchFacts":
        import torch
        return cls(torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None),
                   torch.cuda.is_available, torch.cuda.device_count)


@dataclass(frozen=True)
class Decision:
    device: Literal["cuda", "cpu"]
    why: str

    def line(self) -> str:
        return f"device: {self.device} ({self.why})"


def nvidia_smi_gpus(env: Mapping[str, str]) -> tuple[tuple[Gpu, ...], Optional[str]]:
    """The GPUs nvidia-smi lists (found on env's PATH), and the error text when it runs but fails."""
    exe = shutil.which("nvidia-smi", path=env.get("PATH", ""))
    if not exe:
        return (), None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return (), f"nvidia-smi failed: {err}"
    if out.returncode != 0:
        return (), f"nvidia-smi failed: {(out.stderr or out.stdout).strip().splitlines()[:1]}"
    gpus = []
    for row in out.stdout.strip().splitlines():
        parts = [p.strip() for p in row.split(",")]
        if len(parts) >= 3:
            mem = int(parts[1]) if parts[1].isdigit() else None
            gpus.append(Gpu(parts[0], mem, parts[2]))
    return tuple(gpus), None


def driver_from_file(path: Path = DRIVER_FILE) -> Optional[str]:
    try:
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", path.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def host_facts(env: Mapping[str, str] = os.environ, driver_file: Path = DRIVER_FILE) -> HostFacts:
    gpus, _ = nvidia_smi_gpus(env)
    driver = gpus[0].driver if gpus else driver_from_file(driver_file)
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    hidden = cvd is not None and cvd.strip() in ("", "-1", "NoDevFiles")
    because = []
    if gpus:
        because.append(f"nvidia-smi lists {len(gpus)} GPU{'s' if len(gpus) > 1 else ''}")
    elif driver:
        because.append(f"an NVIDIA driver {driver} is loaded")
    for var in SLURM_GPU_VARS:      # ON_NODE is a count ("0": none); JOB_GPUS/STEP_GPUS list indices ("0": GPU 0)
        value = env.get(var, "").strip()
        if value and value != "(null)" and not (var == "SLURM_GPUS_ON_NODE" and value == "0"):
            because.append(f"{var}={value}")
    # CUDA_VISIBLE_DEVICES alone is no evidence: the deepspeed launcher sets it (0,1,...) on CPU machines
    # too. Next to a driver or SLURM's GPUs it says which GPUs the run was given.
    if cvd and not hidden and because:
        because.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    return HostFacts(gpus, driver, () if hidden else tuple(because), hidden)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def required_driver(torch_cuda: Optional[str]) -> Optional[str]:
    """The oldest driver a torch built for CUDA `torch_cuda` ("12.4") runs on; None if unknown."""
    if not torch_cuda:
        return None
    return MIN_DRIVER.get(_version_tuple(torch_cuda)[0])


def cpu_causes(host: HostFacts, torch_facts: TorchFacts, env: Mapping[str, str]) -> list[str]:
    """Why a run that should use the GPU would train on the CPU (empty: the GPU is usable)."""
    causes = []
    acc = env.get("DS_ACCELERATOR", "")
    if acc and acc != "cuda":
        causes.append(f"DS_ACCELERATOR={acc} is set in the environment (inherited? sbatch passes the "
                      f"submitting shell's variables on): unset it")
    if torch_facts.cuda is None and torch_facts.hip is None:
        causes.append(f"torch {torch_facts.version} is a CPU-only build: install a CUDA build "
                      f"(pip install torch --index-url {WHEEL_INDEX})")
        return causes
    need = required_driver(torch_facts.cuda)
    if need and host.driver and _version_tuple(host.driver) < _version_tuple(need):
        causes.append(f"the NVIDIA driver {host.driver} is too old for torch {torch_facts.version} (built for "
                      f"CUDA {torch_facts.cuda}, which needs driver >= {need}): update the driver or install a "
                      f"torch built for an older CUDA")
    elif not torch_facts.cuda_available():
        where = f"driver {host.driver}" if host.driver else "no NVIDIA driver found (no nvidia-smi, no " \
                                                           f"{DRIVER_FILE})"
        causes.append(f"torch {torch_facts.version} (CUDA {torch_facts.cuda}) sees no GPU ({where})")
    return causes


def decide_device(requested: Requested, env: Mapping[str, str], host: HostFacts,
                  torch_facts: TorchFacts) -> Decision:
    """The device for `--train.device requested`, or DeviceError with one line saying why not."""
    if requested == "cpu":
        return Decision("cpu", "asked by --train.device cpu")
    causes = cpu_causes(host, torch_facts, env)
    if not causes:
        n = torch_facts.device_count()
        return Decision("cuda", f"{'asked by --train.device cuda' if requested == 'cuda' else 'auto'}: "
                                f"{n} GPU{'s' if n != 1 else ''} usable, torch {torch_facts.version} "
                                f"CUDA {torch_facts.cuda}, driver {host.driver or '?'}")
    if host.visible_because:
        raise DeviceError(f"GPUs are visible ({', '.join(host.visible_because)}) but the run would train on "
                          f"the CPU: {'; '.join(causes)} (--train.device cpu if the CPU is what you want)")
    if requested == "cuda":
        raise DeviceError(f"--train.device cuda but no GPU is usable here: {'; '.join(causes)}")
    acc = env.get("DS_ACCELERATOR", "")
    if acc and acc != "cpu":
        raise DeviceError(f"DS_ACCELERATOR={acc} is set but no GPU is usable here: {'; '.join(causes)}"
                          f" (this trainer decides with --train.device; unset DS_ACCELERATOR)")
    hidden = "CUDA_VISIBLE_DEVICES hides them" if host.hidden else \
        "no nvidia-smi, no NVIDIA driver, no SLURM GPU variables"
    return Decision("cpu", f"auto: no GPU on this machine ({hidden})")


def apply(decision: Decision, env: MutableMapping[str, str] = os.environ) -> None:
    """Tell DeepSpeed (it reads DS_ACCELERATOR once, at its first get_accelerator())."""
    old = env.get("DS_ACCELERATOR")
    if old and old != decision.device:
        log.info("DS_ACCELERATOR=%s from the environment replaced by %s (%s)", old, decision.device, decision.why)
    env["DS_ACCELERATOR"] = decision.device


_settled: dict[str, Decision] = {}


def settle_device(requested: Requested) -> Decision:
    """Decide (once per process), set DS_ACCELERATOR, log the decision; DeviceError if it cannot be had."""
    if requested not in _settled:
        decision = decide_device(requested, os.environ, host_facts(os.environ), TorchFacts.of_installed())
        apply(decision)
        log.info("%s", decision.line())
        _settled[requested] = decision
    return _settled[requested]
