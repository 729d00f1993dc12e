"""Bytes that torch allocates inside a block of code, on any device, CPU included.

    with AllocationTracker() as t:
        loss.backward()
    t.peak, t.live        # bytes of storages created inside the block: highest at once, alive now

torch keeps allocator statistics for CUDA only; the kernel tests and bench/bench_decorrelation.py
need the same figure under TRITON_INTERPRET=1 on CPU. A TorchDispatchMode sees every op that
runs below autograd (the autograd engine's own gradient sums included); an op whose schema
returns no alias of its inputs returns fresh storages, which are counted, and a weakref
finalizer on each storage takes it off when its last reference goes (torch keeps a storage's
Python object alive as long as the storage, so the finalizer fires at the real free). What the
Triton interpreter computes in numpy is not counted: a compiled kernel allocates nothing.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that torch ops create while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        results = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for ret, res in zip(returns, results):
            if ret.alias_info is None:  # views, in-place and out= ops return storages that exist
                for t in tree_leaves(res):
                    if isinstance(t, torch.Tensor):
                        self._add(t.untyped_storage())
        return out

    def _add(self, storage) -> None:
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        self.live += nbytes
        self.count += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes
