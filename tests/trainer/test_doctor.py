"""python -m trainer.doctor: the environment report, on this machine as it is and on a GPU node
playing the login-node mistake (an nvidia-smi on PATH as the probe's input, DS_ACCELERATOR=cpu)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.constants import REPO
from tests.trainer.test_device import NEW_ENOUGH, fake_smi
from trainer.doctor import optimizer_of


def _doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    full.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "trainer.doctor", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow          # a fresh interpreter importing torch, deepspeed and the configs: ~10-30 s here
def test_report_on_this_machine(tmp_path):
    p = _doctor("--json", "--out", str(tmp_path), "--", "--train.device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r["usable"] and r["problems"] == []
    assert r["will_use"]["device"] == "cpu" and r["will_use"]["precision"] == "fp32"
    assert r["device"] == "device: cpu (asked by --train.device cpu)"
    assert r["deepspeed"]["accelerator"] == "cpu" and set(r["deepspeed"]["ops"]) == {"fused_adam", "cpu_adam"}
    assert r["packages"]["torch"] and r["torch"]["version"].startswith(r["packages"]["torch"].split("+")[0])
    host = socket.gethostname()
    text = (tmp_path / f"doctor-{host}.txt").read_text()
    assert "the trainer will use: device cpu, precision fp32" in text and text.rstrip().endswith("usable")
    assert json.loads((tmp_path / f"doctor-{host}.json").read_text())["usable"]


@pytest.mark.slow
def test_blocking_problem_exits_1(tmp_path):
    path = fake_smi(tmp_path, NEW_ENOUGH) + os.pathsep + os.environ["PATH"]
    p = _doctor(PATH=path, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="0")
    assert p.returncode == 1, p.stdout + p.stderr
    problem = [line for line in p.stdout.splitlines() if line.startswith("PROBLEM: ")]
    assert problem and "DS_ACCELERATOR=cpu is set" in problem[0] and "NVIDIA H100" in p.stdout
    assert p.stdout.rstrip().endswith("NOT usable: fix the problems above")


def test_optimizer_names():
    name, needs_op = optimizer_of({"optimizer": {"type": "AdamW", "params": {}}})
    assert name.startswith("DeepSpeed FusedAdam (op fused_adam") and needs_op is True
    assert optimizer_of({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}})[1] is False
    offload = {"optimizer": {"type": "AdamW", "params": {}}, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert "cpu_adam" in optimizer_of(offload)[0]
