"""The device decision (trainer/device.py): GPUs visible but unusable is one line naming the cause.

The machine's facts come from the real probes: environment variables, an `nvidia-smi` found on PATH
(here a script printing what a real one prints for the query, as the probe's input) and a driver file.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.constants import REPO
from trainer import device as dev
from trainer.device import DeviceError, TorchFacts, decide_device, host_facts

H100 = "NVIDIA H100 80GB HBM3, 81559, {driver}"
NEW_ENOUGH = "580.95.05"
NO_DRIVER_FILE = Path("/nonexistent/nvidia/version")


def fake_smi(folder: Path, driver: str) -> str:
    """A folder with an nvidia-smi that answers the probe's query; returns a PATH with it first."""
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho '{H100.format(driver=driver)}'\n")
    exe.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


def env_with(**values: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", **values}


def facts(env: dict[str, str]):
    return host_facts(env, driver_file=NO_DRIVER_FILE)


INSTALLED = TorchFacts.of_installed()
CPU_ONLY = TorchFacts("2.5.1+cpu", None)
CUDA12_NO_GPU = TorchFacts("2.5.1+cu124", "12.4")


def test_no_gpu_anywhere_auto_is_cpu_and_says_why():
    env = env_with()
    decision = decide_device("auto", env, facts(env), INSTALLED)
    assert decision.device == "cpu" and "no GPU on this machine" in decision.why
    assert decision.line().startswith("device: cpu (auto: ")


def test_visible_gpus_with_inherited_ds_accelerator_cpu(tmp_path):
    env = env_with(PATH=fake_smi(tmp_path, NEW_ENOUGH), DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="0,1")
    host = facts(env)
    assert host.gpus[0].memory_mib == 81559 and host.driver == NEW_ENOUGH
    with pytest.raises(DeviceError) as err:
        decide_device("auto", env, host, CUDA12_NO_GPU)
    msg = str(err.value)
    assert "nvidia-smi lists 1 GPU" in msg and "CUDA_VISIBLE_DEVICES=0,1" in msg
    assert "DS_ACCELERATOR=cpu" in msg and "--train.device cpu" in msg and "\n" not in msg


def test_cpu_only_torch_is_named():
    env = env_with(SLURM_GPUS_ON_NODE="4")          # a GPU node by SLURM's word alone
    with pytest.raises(DeviceError, match=r"SLURM_GPUS_ON_NODE=4.*CPU-only build.*download.pytorch.org"):
        decide_device("auto", env, facts(env), CPU_ONLY)


def test_old_driver_names_the_driver_needed(tmp_path):
    env = env_with(PATH=fake_smi(tmp_path, "535.104.05"))
    with pytest.raises(DeviceError, match=r"driver 535.104.05 is too old .*CUDA 13.0.*>= 580.65.06"):
        decide_device("auto", env, facts(env), TorchFacts("2.9.0+cu130", "13.0"))
    # the same driver is fine for a CUDA 12 build; then the installed torch's own answer decides
    with pytest.raises(DeviceError, match=r"sees no GPU \(driver 535.104.05\)"):
        decide_device("auto", env, facts(env), CUDA12_NO_GPU)


def test_driver_from_proc_file(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
                    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    host = host_facts(env_with(), driver_file=proc)
    assert host.driver == "550.54.14" and host.visible_because == ("an NVIDIA driver 550.54.14 is loaded",)
    assert dev.required_driver("12.8") == "525.60.13" and dev.required_driver(None) is None


def test_cpu_asked_wins_and_tells_deepspeed(tmp_path):
    env = env_with(PATH=fake_smi(tmp_path, NEW_ENOUGH), CUDA_VISIBLE_DEVICES="0", DS_ACCELERATOR="cuda")
    decision = decide_device("cpu", env, facts(env), INSTALLED)
    assert decision.line() == "device: cpu (asked by --train.device cpu)"
    dev.apply(decision, env)
    assert env["DS_ACCELERATOR"] == "cpu"


def test_cuda_asked_without_gpu_is_one_line():
    env = env_with()
    with pytest.raises(DeviceError, match=r"^--train.device cuda but no GPU is usable here: torch .* sees no GPU"):
        decide_device("cuda", env, facts(env), CUDA12_NO_GPU)
    env = env_with(DS_ACCELERATOR="cuda")
    with pytest.raises(DeviceError, match="DS_ACCELERATOR=cuda is set but no GPU is usable"):
        decide_device("auto", env, facts(env), CUDA12_NO_GPU)


def test_a_launchers_cuda_visible_devices_alone_is_no_gpu():
    """The deepspeed launcher sets CUDA_VISIBLE_DEVICES=0,1 for its ranks on a CPU machine too."""
    env = env_with(CUDA_VISIBLE_DEVICES="0,1")
    host = facts(env)
    assert host.visible_because == ()
    assert decide_device("auto", env, host, CUDA12_NO_GPU).device == "cpu"
    env = env_with(CUDA_VISIBLE_DEVICES="0,1", SLURM_STEP_GPUS="4,5")
    assert facts(env).visible_because == ("SLURM_STEP_GPUS=4,5", "CUDA_VISIBLE_DEVICES=0,1")
    # SLURM's GPU lists name indices: a job given GPU 0 has SLURM_JOB_GPUS=0; SLURM_GPUS_ON_NODE=0 is a count
    assert facts(env_with(SLURM_JOB_GPUS="0")).visible_because == ("SLURM_JOB_GPUS=0",)
    assert facts(env_with(SLURM_GPUS_ON_NODE="0")).visible_because == ()


def test_hidden_gpus_mean_cpu(tmp_path):
    env = env_with(PATH=fake_smi(tmp_path, NEW_ENOUGH), CUDA_VISIBLE_DEVICES="")
    decision = decide_device("auto", env, facts(env), CUDA12_NO_GPU)
    assert decision.device == "cpu" and "CUDA_VISIBLE_DEVICES hides them" in decision.why


def test_settle_device_reads_the_process_environment(monkeypatch, caplog):
    monkeypatch.setattr(dev, "_settled", {})
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    for var in ("CUDA_VISIBLE_DEVICES", *dev.SLURM_GPU_VARS):
        monkeypatch.delenv(var, raising=False)
    if torch.cuda.is_available() or dev.DRIVER_FILE.exists():
        pytest.skip("a GPU machine: the no-GPU path cannot be played here")
    with caplog.at_level("INFO", logger="trainer.device"):
        decision = dev.settle_device("cpu")
        dev.settle_device("cpu")
    assert decision.device == "cpu" and os.environ["DS_ACCELERATOR"] == "cpu"
    assert [r.getMessage() for r in caplog.records] == ["device: cpu (asked by --train.device cpu)"]


def test_train_py_stops_before_anything_starts(tmp_path):
    """The login-node mistake end to end: an inherited DS_ACCELERATOR=cpu on a GPU node."""
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PATH": fake_smi(tmp_path / "bin", NEW_ENOUGH) + ":" + os.environ["PATH"],
           "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--train.run-dir", str(work / "run")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: GPUs are visible"), out.stderr
    assert "DS_ACCELERATOR=cpu is set" in lines[0] and "Traceback" not in out.stderr
    assert list(work.iterdir()) == []          # no run folder, no MLflow store, no corpus
    assert took < 60, took                     # seconds: no process group, no model
