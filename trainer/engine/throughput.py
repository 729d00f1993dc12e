"""Throughput, MFU and memory for the step logs."""
from __future__ import annotations

import os
import resource
import time

import torch

# Dense bf16 peak (no sparsity), by device name; AVSR_PEAK_TFLOPS overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops() -> float | None:
    if os.environ.get("AVSR_PEAK_TFLOPS"):
        return float(os.environ["AVSR_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gb() -> dict[str, float]:
    out = {"mem/host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        out["mem/gpu_peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["mem/gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return out


class ThroughputMeter:
    """Accumulates counts between logs; `rates()` returns per-second figures and resets."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = self.tokens = self.flops = 0.0
        self.steps = 0

    def update(self, samples: int, tokens: int, flops: float) -> None:
        self.samples += samples
        self.tokens += tokens
        self.flops += flops

    def step(self) -> None:
        self.steps += 1

    def rates(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        # counts are this rank's; ranks run the same number of steps on similar batches
        out = {
            "perf/samples_per_s": self.samples * self.world_size / dt,
            "perf/tokens_per_s": self.tokens * self.world_size / dt,
            "perf/step_time_s": dt / max(self.steps, 1),
        }
        peak = peak_flops()
        if peak:
            out["perf/mfu"] = self.flops / dt / peak
        self.reset()
        return out
