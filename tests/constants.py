"""What the tests share besides fixtures: the repository root, and where the Triton kernels run.

Imported by conftest.py before any test module, so the kernel choice is made before a kernel is
decorated; tests import it as `tests.constants` (never conftest, which pytest imports itself).
"""
import os
from pathlib import Path

import torch

# Triton kernels: compiled on a GPU; elsewhere interpreted on CPU tensors. Triton reads this when
# a kernel is decorated, so it is decided here, before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if TRITON_INTERPRETED else "cuda"   # where tests run the Triton kernels
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
