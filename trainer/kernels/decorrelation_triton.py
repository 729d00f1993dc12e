"""Fused Triton decorrelation loss: forward and backward over all selected layers.

Math (per layer l, row b; s >= 1 with M[b, s]; g = dLoss * 2 / (L * sum(M))):
    r_s = 1 / max(||h_s||, eps),  kap_s = [||h_s|| > eps] r_s^2,  c_s = (h_0 . h_s) r_0 r_s
    dh_s = g c_s (r_0 r_s h_0 - c_s kap_s h_s)                 = a_s h_0 - k_s h_s
    dh_0 = sum_s a_s h_s - g (sum_s c_s^2) kap_0 h_0

Launch strategy: one launch per pass for all L layers, through a layer table (int64
[L, 4]: each layer's element offset from layer 0, and its three strides). Layers stay
where they are (no stacking copy, any strides, a list from transformers or a [L, B, T, D]
view), and a step costs 2 launches instead of 2L (L = 27 for Llama-3.2-3B: per-layer
launches cost tens of us of host time each, comparable to the kernels themselves).

Traffic: forward reads the BOS row and the prefix rows once (masked loads skip the
transcript and padding) and writes O(L*B*T) fp32 statistics (c, r, kap; slot s = 0 holds
BOS's r and kap). Backward reads the same rows once and writes the gradient once. Its
grid is (D-chunks, B, L): each program owns a BLOCK_D slice of one (l, b) and walks all
rows, so the BOS gradient, a sum over s, is accumulated in registers and written once:
no atomics, no second pass. Saved for backward: references to H, the mask and the
three [L, B, T] fp32 statistics; never a normalised or fp32 copy of H. The backward
allocates the gradients it returns (written in place by the kernel, one storage per layer
for a list of layers) and O(L) bytes of tables besides: nothing else of H's size.
"""
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .decorrelation_reference import EPS, as_layers


@triton.jit
def _row0(tab_ptr, h0_ptr, l, b, VEC: tl.constexpr):
    """Pointer to H^l[b, 0] and the layer's t and d strides, from the table.

    Offsets from h0_ptr rather than raw pointers: h0_ptr is specialised as 16-byte aligned,
    and the multiple_of hints (VEC elements = 16 bytes when the launcher checked every offset
    and stride) restore the alignment facts that values loaded from memory would lose, so the
    compiler can still emit 16-byte vector loads.
    """
    off = tl.multiple_of(tl.load(tab_ptr + l * 4), VEC)
    stride_b = tl.multiple_of(tl.load(tab_ptr + l * 4 + 1), VEC)
    stride_t = tl.multiple_of(tl.load(tab_ptr + l * 4 + 2), VEC)
    stride_d = tl.load(tab_ptr + l * 4 + 3)
    return h0_ptr + off + b * stride_b, stride_t, stride_d


@triton.jit
def _decorrelation_fwd_kernel(
    tab_ptr,      # int64 [L, 4]: element offset from h0_ptr, stride_b, stride_t, stride_d
    h0_ptr,       # layer 0: the base the offsets are relative to
    mask_ptr,     # uint8 [B, T]
    cos_ptr,      # fp32 [L, B, T] out: c_s (0 off the mask and at s = 0)
    rn_ptr,       # fp32 [L, B, T] out: r_s (r_0 at s = 0)
    kap_ptr,      # fp32 [L, B, T] out: kap_s (kap_0 at s = 0)
    B, T, D, eps,
    D_CONTIG: tl.constexpr, VEC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    l = tl.program_id(2)
    row0, stride_t, stride_d = _row0(tab_ptr, h0_ptr, l, b, VEC)

    rows = 1 + pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    in_t = rows < T
    m = tl.load(mask_ptr + b * T + rows, mask=in_t, other=0) != 0
    cols = tl.arange(0, BLOCK_D)

    dot = tl.zeros([BLOCK_S], dtype=tl.float32)
    sq = tl.zeros([BLOCK_S], dtype=tl.float32)
    sq0 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        cm = c < D
        coff = c if D_CONTIG else c * stride_d
        x0 = tl.load(row0 + coff, mask=cm, other=0.0).to(tl.float32)
        x = tl.load(row0 + rows[:, None] * stride_t + coff[None, :],
                    mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
        dot += tl.sum(x * x0[None, :], axis=1)
        sq += tl.sum(x * x, axis=1)
        sq0 += x0 * x0  # every program recomputes ||h_0||: an L2-resident re-read, no sync

    n0 = tl.sqrt(tl.sum(sq0, axis=0))
    n = tl.sqrt(sq)
    r0 = 1.0 / tl.maximum(n0, eps)
    r = 1.0 / tl.maximum(n, eps)
    out = (l * B + b).to(tl.int64) * T
    tl.store(cos_ptr + out + rows, tl.where(m, dot * r0 * r, 0.0), mask=in_t)
    tl.store(rn_ptr + out + rows, r, mask=in_t)
    tl.store(kap_ptr + out + rows, tl.where(n > eps, r * r, 0.0), mask=in_t)
    if pid_s == 0:
        tl.store(cos_ptr + out, 0.0)
        tl.store(rn_ptr + out, r0)
        tl.store(kap_ptr + out, tl.where(n0 > eps, r0 * r0, 0.0))


@triton.jit
def _decorrelation_bwd_kernel(
    tab_ptr, h0_ptr,
    gtab_ptr,                        # int64 [L]: element offset of each layer's gradient from grad_ptr
    grad_ptr,                        # layer 0's gradient: each layer's is a contiguous [B, T, D] in H's dtype
    mask_ptr, cos_ptr, rn_ptr, kap_ptr,
    scale_ptr,                       # fp32 [1]: dLoss * 2 / (L * max(sum(M), 1))
    B, T, D,
    D_CONTIG: tl.constexpr, VEC: tl.constexpr, GVEC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    l = tl.program_id(2)
    row0, stride_t, stride_d = _row0(tab_ptr, h0_ptr, l, b, VEC)

    g = tl.load(scale_ptr)
    stat = (l * B + b).to(tl.int64) * T
    r0 = tl.load(rn_ptr + stat)
    k0 = tl.load(kap_ptr + stat)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = c < D
    coff = c if D_CONTIG else c * stride_d
    x0 = tl.load(row0 + coff, mask=cm, other=0.0).to(tl.float32)
    # multiple_of: as in _row0, so the stores stay 16-byte vectors (GVEC: the launcher checked the offsets)
    gout = grad_ptr + tl.multiple_of(tl.load(gtab_ptr + l), GVEC) + (b * T).to(tl.int64) * D

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)     # sum_s a_s h_s, this program's D slice
    c2 = tl.zeros([BLOCK_S], dtype=tl.float32)      # sum_s c_s^2
    for s0 in range(1, T, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        in_t = rows < T
        m = tl.load(mask_ptr + b * T + rows, mask=in_t, other=0) != 0
        cs = tl.load(cos_ptr + stat + rows, mask=m, other=0.0)
        a = g * cs * r0 * tl.load(rn_ptr + stat + rows, mask=m, other=0.0)
        k = g * cs * cs * tl.load(kap_ptr + stat + rows, mask=m, other=0.0)
        x = tl.load(row0 + rows[:, None] * stride_t + coff[None, :],
                    mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
        gx = a[:, None] * x0[None, :] - k[:, None] * x   # 0 on rows off the mask
        tl.store(gout + rows[:, None] * D + c[None, :], gx.to(grad_ptr.dtype.element_ty),
                 mask=in_t[:, None] & cm[None, :])
        acc += tl.sum(a[:, None] * x, axis=0)
        c2 += cs * cs
    g0 = acc - g * tl.sum(c2, axis=0) * k0 * x0
    tl.store(gout + c, g0.to(grad_ptr.dtype.element_ty), mask=cm)


# (BLOCK_S, BLOCK_D, num_warps) per pass on GPU; bench/bench_decorrelation.py --sweep tries
# others. 4096-element tiles give each thread four 16-byte loads per step. Forward grids are
# L*B*T/16 programs; backward ones L*B*D/128 (5184 for L=27, B=8, D=3072: ~2.5 waves of 16
# resident programs on 132 SMs, so the long-running programs leave a small tail).
GPU_BLOCKS = {"fwd": (16, 256, 4), "bwd": (32, 128, 4)}
# Under TRITON_INTERPRET=1 cost is per program, not per element: one program per (l, b) where
# T and D fit these caps (ENV.md: 1 program 7 ms, 512 programs 1 s).
INTERPRETER_CAPS = (128, 1024)
TILINGS = ("gpu", "interpreter")


def default_tiling(device: torch.device) -> str:
    """The tiling a launch on `device` uses: 'gpu' on CUDA, 'interpreter' elsewhere."""
    return "gpu" if device.type == "cuda" else "interpreter"


def block_sizes(T: int, D: int, which: str, tiling: str) -> tuple[int, int, int]:
    """(BLOCK_S, BLOCK_D, num_warps) for pass `which` ("fwd" or "bwd") under `tiling`.

    A tiling is a choice of tile sizes, not of device: the interpreter runs the 'gpu' tiling too,
    which is how the tests exercise the loops over T and D tiles that real sizes take on a GPU."""
    if which not in GPU_BLOCKS:
        raise ValueError(f"which must be one of {tuple(GPU_BLOCKS)}, got {which!r}")
    if tiling == "interpreter":
        cap_s, cap_d = INTERPRETER_CAPS
        return min(triton.next_power_of_2(max(T - 1, 1)), cap_s), min(triton.next_power_of_2(D), cap_d), 1
    if tiling == "gpu":
        bs, bd, warps = GPU_BLOCKS[which]
        return bs, min(triton.next_power_of_2(D), bd), warps
    raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")


def _offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """(element offsets of each tensor from the first, 16-byte vector width or 1 if unaligned)."""
    size = tensors[0].element_size()
    p0 = tensors[0].data_ptr()
    if any((t.data_ptr() - p0) % size for t in tensors):
        raise ValueError("tensors are not element-aligned relative to each other")
    offsets = [(t.data_ptr() - p0) // size for t in tensors]
    vec = 16 // size
    return offsets, vec if p0 % 16 == 0 and all(o % vec == 0 for o in offsets) else 1


def _device_table(rows: list, device: torch.device) -> torch.Tensor:
    tab = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # pinned + non_blocking: a pageable copy would stall the host on the stream.
        tab = tab.pin_memory().to(device, non_blocking=True)
    return tab


def _layer_table(layers: list[torch.Tensor]) -> tuple[torch.Tensor, int, bool]:
    """(int64 [L, 4] table of offsets from layers[0] and strides, VEC, D_CONTIG)."""
    offsets, vec = _offsets(layers)
    rows = [[o, *h.stride()] for o, h in zip(offsets, layers)]
    if any(r[1] % vec or r[2] % vec for r in rows):
        vec = 1
    return _device_table(rows, layers[0].device), vec, all(r[3] == 1 for r in rows)


def _new_grads(stacked: bool, L: int, like: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """The gradients to return, the int64 [L] table of each layer's offset from the first, GVEC.

    The gradient is the backward's only H-sized allocation. A stacked input gets one [L, B, T, D];
    a list gets one [B, T, D] per layer, each its own storage: autograd then steals each into its
    leaf's .grad, or accumulates into it in place and frees it when its layer's backward is done.
    (Views of one [L, B, T, D] buffer would keep all of it alive until the last layer's backward,
    and their shared storage rules out autograd's in-place accumulation.)"""
    B, T, D = like.shape[-3:]
    if stacked:
        grads = [torch.empty((L, B, T, D), device=like.device, dtype=like.dtype)]
        per_layer = list(grads[0].unbind(0))
    else:
        grads = per_layer = [torch.empty((B, T, D), device=like.device, dtype=like.dtype) for _ in range(L)]
    offsets, gvec = _offsets(per_layer)
    return grads, _device_table(offsets, like.device), gvec


class DecorrelationFunction(torch.autograd.Function):
    """forward(mask, eps, tiling, *layers): layers is one [L, B, T, D] tensor or L [B, T, D] tensors."""

    @staticmethod
    def forward(ctx, prefix_mask: torch.Tensor, eps: float, tiling: str, *layers: torch.Tensor) -> torch.Tensor:
        stacked = layers[0] if len(layers) == 1 and layers[0].dim() == 4 else None
        views = as_layers(stacked if stacked is not None else layers)
        L = len(views)
        B, T, D = views[0].shape
        dev = views[0].device
        if prefix_mask.shape != (B, T):
            raise ValueError(f"prefix_mask {tuple(prefix_mask.shape)} does not match [B={B}, T={T}]")
        mask = prefix_mask.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8)
        tab, vec, d_contig = _layer_table(views)
        cos, rn, kap = (torch.empty((L, B, T), device=dev, dtype=torch.float32) for _ in range(3))
        BS, BD, warps = block_sizes(T, D, "fwd", tiling)
        grid = (max(triton.cdiv(T - 1, BS), 1), B, L)
        _decorrelation_fwd_kernel[grid](
            tab, views[0], mask, cos, rn, kap, B, T, D, eps,
            D_CONTIG=d_contig, VEC=vec, BLOCK_S=BS, BLOCK_D=BD, num_warps=warps,
        )
        denom = mask[:, 1:].sum().float().clamp_min(1.0) * L
        ctx.save_for_backward(mask, cos, rn, kap, denom, tab, *layers)
        ctx.meta = (stacked is not None, L, B, T, D, d_contig, vec, tiling)
        return cos.square().sum() / denom

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        mask, cos, rn, kap, denom, tab, *layers = ctx.saved_tensors
        is_stacked, L, B, T, D, d_contig, vec, tiling = ctx.meta
        grads, gtab, gvec = _new_grads(is_stacked, L, layers[0])
        scale = (grad_out.float() * 2.0 / denom).reshape(1)
        BS, BD, warps = block_sizes(T, D, "bwd", tiling)
        grid = (triton.cdiv(D, BD), B, L)
        _decorrelation_bwd_kernel[grid](
            tab, layers[0], gtab, grads[0], mask, cos, rn, kap, scale, B, T, D,
            D_CONTIG=d_contig, VEC=vec, GVEC=gvec, BLOCK_S=BS, BLOCK_D=BD, num_warps=warps,
        )
        return (None, None, None, *grads)


def decorrelation_loss_triton(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    prefix_mask: torch.Tensor,
    eps: float = EPS,
    tiling: str | None = None,
) -> torch.Tensor:
    """Fused decorrelation loss (fp32 scalar); same contract as decorrelation_loss_reference.
    tiling: 'gpu' or 'interpreter' block sizes (block_sizes); None picks by device."""
    first = hidden_states if isinstance(hidden_states, torch.Tensor) else next(iter(hidden_states))
    tiling = default_tiling(first.device) if tiling is None else tiling
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
    if isinstance(hidden_states, torch.Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(f"expected [L, B, T, D], got shape {tuple(hidden_states.shape)}")
        return DecorrelationFunction.apply(prefix_mask, eps, tiling, hidden_states)
    layers = as_layers(hidden_states)  # validates shapes, dtypes, devices
    return DecorrelationFunction.apply(prefix_mask, eps, tiling, *layers)
