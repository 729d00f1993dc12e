"""Decorrelation loss: Triton kernel vs the PyTorch reference, and the reference vs the formula.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/constants.py sets it
before anything imports triton); on a GPU the same tests run the compiled kernels on CUDA tensors,
and the tests marked by CUDA add larger shapes.
"""
import gc
import os

import pytest
import torch

from tests.constants import KERNEL_DEVICE, REPO, TRITON_INTERPRETED
from trainer.kernels import DecorrelationLoss, decorrelation_loss, resolve_impl
from trainer.kernels.decorrelation_reference import EPS, decorrelation_loss_reference
from trainer.kernels.decorrelation_triton import block_sizes, decorrelation_loss_triton
from trainer.kernels.memory import AllocationTracker

# Relative to the largest gradient: the BOS gradient is a difference of near-equal sums, so
# its small entries carry fp32 roundoff of order 1e-6 of the largest, in the kernel and in an
# fp32 reference alike. Hence the kernel is compared with the reference run in fp64.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def make_mask(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Prefix after BOS, then (unmasked) transcript and padding; rows: random, 1 token, empty, full."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(1, max(T - 1, 1) + 1, (1,), generator=g)), 1, 0, T - 1][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(lengths):
        mask[b, 1:1 + min(p, T - 1)] = True
    return mask


def make_hidden(L: int, B: int, T: int, D: int, dtype=torch.float32, device=KERNEL_DEVICE,
                seed: int = 0) -> torch.Tensor:
    """Tokens partly aligned with BOS (as attention sinks are), so cosines span (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, B, T, D, generator=g, dtype=torch.float64)
    align = torch.rand(L, B, T, 1, generator=g, dtype=torch.float64) * 4 - 2
    h = h + align * h[:, :, :1]
    return h.to(device=device, dtype=dtype)


def loss_and_grads(fn, hidden, mask):
    """fn on a fresh leaf copy (a list of leaves if `hidden` is a list) -> (loss, [grads])."""
    leaves = [h.detach().clone().requires_grad_() for h in hidden] if isinstance(hidden, list) \
        else hidden.detach().clone().requires_grad_()
    loss = fn(leaves, mask)
    loss.backward()
    grads = [h.grad for h in leaves] if isinstance(leaves, list) else [leaves.grad]
    return loss.detach(), grads


def triton_impl(h, m):
    return decorrelation_loss(h, m, impl="triton")


def assert_matches_reference(hidden, mask, dtype, tiling=None):
    """Kernel on `hidden` (in `dtype`, block sizes of `tiling`) vs the reference on the same values in fp64."""
    loss, grads = loss_and_grads(lambda h, m: decorrelation_loss_triton(h, m, tiling=tiling), hidden, mask)
    exact = [h.double() for h in hidden] if isinstance(hidden, list) else hidden.double()
    ref_loss, ref_grads = loss_and_grads(decorrelation_loss_reference, exact, mask)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss, rtol=TOL[dtype]["rtol"], atol=1e-7)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        scale = r.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(g.double() / scale, r / scale, **TOL[dtype])


# ---------------------------------------------------------------- the reference itself

def naive_loss(hidden: torch.Tensor, mask: torch.Tensor, eps: float = EPS) -> float:
    total, count = 0.0, int(mask[:, 1:].sum())
    for h in hidden.double():
        for b in range(h.shape[0]):
            for s in range(1, h.shape[1]):
                if mask[b, s]:
                    x, y = h[b, 0], h[b, s]
                    cos = float(x @ y) / (max(float(x.norm()), eps) * max(float(y.norm()), eps))
                    total += cos * cos
    return total / (hidden.shape[0] * max(count, 1))


def test_reference_matches_naive_loop():
    hidden, mask = make_hidden(3, 4, 7, 24, torch.float64), make_mask(4, 7)
    assert decorrelation_loss_reference(hidden, mask).item() == pytest.approx(naive_loss(hidden, mask), rel=1e-12)


def test_reference_gradcheck():
    hidden = make_hidden(2, 3, 5, 6, torch.float64).requires_grad_()
    mask = make_mask(3, 5)
    assert torch.autograd.gradcheck(lambda h: decorrelation_loss_reference(h, mask), (hidden,))


# ---------------------------------------------------------------- kernel vs reference

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [24, 100, 130])
@pytest.mark.parametrize("T", [2, 7, 37])
@pytest.mark.parametrize("L", [1, 3])
def test_triton_matches_reference(L, T, D, dtype):
    assert_matches_reference(make_hidden(L, 4, T, D, dtype, seed=T * D + L), make_mask(4, T, seed=T), dtype)


def tiles(T: int, D: int, tiling: str) -> dict[str, tuple[int, int]]:
    """Per pass, how many tiles a program loops over or the grid spans: (along T, along D)."""
    out = {}
    for which in ("fwd", "bwd"):
        bs, bd, _ = block_sizes(T, D, which, tiling)
        out[which] = (-(-(T - 1) // bs), -(-D // bd))
    return out


def test_block_sizes():
    assert block_sizes(300, 2100, "fwd", "gpu") == (16, 256, 4)
    assert block_sizes(300, 2100, "bwd", "gpu") == (32, 128, 4)
    assert block_sizes(300, 2100, "bwd", "interpreter") == (128, 1024, 1)
    assert block_sizes(7, 24, "fwd", "interpreter") == (8, 32, 1)        # one tile: a program per (l, b)
    assert block_sizes(7, 24, "bwd", "gpu") == (32, 32, 4)               # BLOCK_D never above D's power of 2
    with pytest.raises(ValueError):
        block_sizes(7, 24, "bwd", "cuda")
    with pytest.raises(ValueError):
        decorrelation_loss_triton(make_hidden(1, 2, 7, 24), make_mask(2, 7), tiling="cuda")


# GPU tiling under the interpreter: shapes over several T and D tiles in both passes (the forward loops
# over D tiles and its grid spans T tiles, the backward the other way round), last tiles partial (one
# row, one column), D odd or not a multiple of 16 (no 16-byte vectors), rows of every kind of mask
# (random prefix, 1 token, empty, full), a list of layers (the trainer's form) and a stacked tensor.
GPU_TILED = [(2, 4, 50, 300, "list"), (3, 3, 34, 257, "stacked"), (1, 4, 70, 601, "stacked")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L,B,T,D,form", GPU_TILED)
def test_gpu_tiling_matches_reference(L, B, T, D, form, dtype):
    n = tiles(T, D, "gpu")
    assert min(n["fwd"]) >= 2 and min(n["bwd"]) >= 2, n
    hidden, mask = make_hidden(L, B, T, D, dtype, seed=D), make_mask(B, T, seed=T)
    assert_matches_reference(list(hidden.unbind(0)) if form == "list" else hidden, mask, dtype, tiling="gpu")


@pytest.mark.slow
@pytest.mark.skipif(not TRITON_INTERPRETED, reason="the CUDA tests run these tile sizes compiled")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tiling", ["gpu", "interpreter"])
def test_tiling_at_llama_like_sizes(tiling, dtype):
    """T=300, D=2100: 19 x 9 forward and 10 x 17 backward GPU tiles (~35 s each interpreted here)."""
    L, B, T, D = 2, 4, 300, 2100
    assert min(min(n) for n in tiles(T, D, tiling).values()) >= 2
    hidden = make_hidden(L, B, T, D, dtype, seed=1)
    assert_matches_reference(list(hidden.unbind(0)), make_mask(B, T, seed=3), dtype, tiling=tiling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_list_and_stacked_identical(dtype):
    hidden, mask = make_hidden(3, 4, 37, 130, dtype), make_mask(4, 37)
    loss_s, (grad_s,) = loss_and_grads(triton_impl, hidden, mask)
    loss_l, grads_l = loss_and_grads(triton_impl, list(hidden.unbind(0)), mask)
    assert torch.equal(loss_s, loss_l)
    assert all(torch.equal(grad_s[i], g) for i, g in enumerate(grads_l))
    # layers in reverse memory order: negative offsets from layer 0
    loss_r, grads_r = loss_and_grads(triton_impl, list(hidden.unbind(0))[::-1], mask)
    loss_f, (grad_f,) = loss_and_grads(triton_impl, hidden.flip(0), mask)
    assert torch.equal(loss_r, loss_s) and torch.equal(loss_f, loss_s)
    assert all(torch.equal(grad_s[2 - i], g) and torch.equal(grad_f[i], g) for i, g in enumerate(grads_r))


def test_non_contiguous_stacked():
    # [L, B, T, D] as a permuted slice of a bigger buffer: no unit stride on B, T or L.
    base = make_hidden(4, 3, 41, 130)                          # [B'=4, L'=3, T'=41, D'=130] storage
    hidden = base.permute(1, 0, 2, 3)[:, :3, 2:39, :100]       # [3, 3, 37, 100]
    assert not hidden.is_contiguous()
    assert_matches_reference(hidden, make_mask(3, 37), torch.float32)


def test_non_contiguous_layers_with_different_strides():
    # A list whose layers have different strides, including D not unit-stride (transposed storage).
    mask = make_mask(4, 37)
    a = make_hidden(1, 4, 37, 100, seed=1)[0]
    b = make_hidden(1, 4, 100, 37, seed=2)[0].transpose(1, 2)  # stride_d = 37
    c = make_hidden(1, 4, 40, 120, seed=3)[0][:, 3:, 10:110]
    layers = [a, b, c]
    assert b.stride(2) != 1 and not c.is_contiguous()
    assert_matches_reference(layers, mask, torch.float32)
    loss = decorrelation_loss(layers, mask, impl="triton")
    torch.testing.assert_close(loss, decorrelation_loss([h.contiguous() for h in layers], mask, impl="triton"))


def test_empty_mask_gives_zero_with_grad_path():
    hidden = make_hidden(2, 3, 7, 24).requires_grad_()
    for impl in ("triton", "torch"):
        loss = decorrelation_loss(hidden, torch.zeros(3, 7, dtype=torch.bool), impl=impl)
        assert loss.item() == 0.0 and loss.requires_grad
        (grad,) = torch.autograd.grad(loss, hidden)
        assert torch.count_nonzero(grad) == 0


def test_only_bos_column():
    assert_matches_reference(make_hidden(2, 3, 1, 100), torch.zeros(3, 1, dtype=torch.bool), torch.float32)


def test_zero_rows_give_finite_gradients():
    hidden, mask = make_hidden(2, 4, 7, 24), make_mask(4, 7)
    hidden[:, :, 5:] = 0          # zero padding rows (and masked rows where the prefix is long)
    hidden[1, 2, 0] = 0           # a zero BOS
    loss, (grad,) = loss_and_grads(triton_impl, hidden, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_matches_reference(hidden, mask, torch.float32)


def test_bos_position_never_penalised():
    hidden, mask = make_hidden(2, 4, 7, 24), make_mask(4, 7)
    with_bos = mask.clone()
    with_bos[:, 0] = True
    for impl in ("triton", "torch"):
        assert decorrelation_loss(hidden, with_bos, impl=impl) == decorrelation_loss(hidden, mask, impl=impl)


def test_gradient_zero_off_mask():
    hidden, mask = make_hidden(2, 4, 37, 100), make_mask(4, 37)
    _, (grad,) = loss_and_grads(triton_impl, hidden, mask)
    mask = mask.to(grad.device)
    off = ~mask
    off[:, 0] = False  # BOS collects from all its pairs
    assert torch.count_nonzero(grad[:, off]) == 0
    assert torch.count_nonzero(grad[:, mask]) > 0


def test_saves_no_copy_of_hidden_states():
    """Backward may keep H itself (same storage) and O(L*B*T) statistics, nothing H-sized."""
    hidden, mask = make_hidden(3, 4, 37, 100).requires_grad_(), make_mask(4, 37)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        decorrelation_loss(hidden, mask, impl="triton")
    L, B, T, _ = hidden.shape
    for t in saved:
        assert t.data_ptr() == hidden.data_ptr() or t.numel() <= L * B * T, tuple(t.shape)


# ---------------------------------------------------------------- memory of the backward
# Measured with AllocationTracker (trainer/kernels/memory.py): bytes of the torch storages created
# inside a block and still alive, on CPU too. The Triton interpreter keeps a launch's arguments in a
# reference cycle until the next collection (its _init_args_hst closure), hence a collection before
# reading what is alive; a compiled launch holds nothing.

@pytest.fixture
def collect():
    """gc.collect over what the test made: gc.freeze() sets the older heap aside (300k objects once
    torch and triton are imported), so a collection costs microseconds rather than most of a second."""
    gc.freeze()
    yield gc.collect
    gc.unfreeze()


def test_allocation_tracker_counts_storages_until_freed():
    with AllocationTracker() as t:
        a = torch.empty(1000, dtype=torch.float32)   # 4000 bytes
        v = a[10:]                                    # a view: no new storage
        a.add_(1)                                     # in place: none either
        b = a * 2                                     # 4000 more
    assert (t.peak, t.live) == (8000, 8000)
    del a
    assert t.live == 8000                             # the view keeps its storage
    del v, b
    assert (t.peak, t.live) == (8000, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", ["list", "stacked"])
def test_backward_allocates_only_the_gradients(form, dtype, collect):
    """Beyond the gradients it returns, the backward allocates less than one [L, B, T] fp32 statistic; the
    gradients become the leaves' .grad as written (no copy), one storage per layer for a list."""
    L, B, T, D = 3, 4, 37, 100
    hidden, mask = make_hidden(L, B, T, D, dtype), make_mask(B, T)
    leaves = [h.clone().requires_grad_() for h in hidden] if form == "list" else [hidden.clone().requires_grad_()]
    loss = decorrelation_loss(leaves if form == "list" else leaves[0], mask, impl="triton")
    with AllocationTracker() as t:
        loss.backward()
    collect()
    unit = B * T * D * hidden.element_size()
    storages = [h.grad.untyped_storage().nbytes() for h in leaves]
    assert storages == ([unit] * L if form == "list" else [L * unit])
    assert t.peak - L * unit < L * B * T * 4, t.peak - L * unit
    assert t.live == L * unit
    for i, h in enumerate(leaves):            # each layer's gradient is freed on its own
        h.grad = None
        collect()
        assert t.live == L * unit - sum(storages[:i + 1]), (i, t.live / unit)


def test_backward_frees_each_layer_gradient_once_used(collect):
    """As in the model: layer l's output feeds layer l+1 and the loss. The loss's gradient for a layer is
    accumulated into in place and freed when the backward has gone through that layer, so what the loss
    holds shrinks by a layer per layer. (Views of one shared [L, B, T, D] buffer kept all of it until the
    backward reached layer 0, and ruled out in-place accumulation: 7 layers' worth at layers 5 to 1.)"""
    L, B, T, D = 6, 4, 37, 100
    mask = make_mask(B, T)
    x = make_hidden(1, B, T, D)[0].requires_grad_()
    layers, h = [], x
    for _ in range(L):
        h = torch.tanh(h)      # its backward saves only its output: no activations to account for
        layers.append(h)
    loss = decorrelation_loss(layers, mask, impl="triton") + layers[-1].square().mean()  # "CE" on the last
    live = {}

    def record(l):
        def hook(grad):
            collect()
            live[l] = t.live
        return hook

    for l, h in enumerate(layers):
        h.register_hook(record(l))
    with AllocationTracker() as t:
        loss.backward()
    unit, small = B * T * D * 4, L * B * T * 4
    # reaching layer l: the loss's gradients of layers below, and layer l's own (accumulated) gradient
    assert all(live[l] <= (l + 1) * unit + small for l in range(L)), {l: v / unit for l, v in live.items()}
    assert t.peak <= (L + 2) * unit + small, t.peak / unit   # + the "CE" gradient and tanh's output


def test_module_and_dispatch():
    hidden, mask = make_hidden(2, 4, 7, 24), make_mask(4, 7)
    weighted, raw = DecorrelationLoss(weight=10.0, impl="torch")(hidden, mask)
    assert weighted.item() == pytest.approx(10.0 * raw.item())
    assert resolve_impl("auto", torch.device("cpu")) == ("triton" if TRITON_INTERPRETED else "torch")
    assert resolve_impl("auto", torch.device("cuda")) == "triton"
    assert resolve_impl("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError):
        resolve_impl("cuda", torch.device("cpu"))
    with pytest.raises(ValueError):
        decorrelation_loss(hidden, mask[:, :5], impl="triton")


# ---------------------------------------------------------------- GPU (compiled kernels)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L,B,T,D", [(3, 4, 333, 3072), (2, 8, 129, 2048), (1, 3, 37, 130)])
def test_cuda_matches_reference(L, B, T, D, dtype):
    hidden = make_hidden(L, B, T, D, dtype, device="cuda", seed=T)
    mask = make_mask(B, T, seed=T).cuda()
    assert_matches_reference(hidden, mask, dtype)
    assert_matches_reference(list(hidden.unbind(0)), mask, dtype)


@pytest.mark.gpu
def test_cuda_non_contiguous():
    base = make_hidden(4, 3, 41, 2100, torch.bfloat16, device="cuda")
    hidden = base.permute(1, 0, 2, 3)[:, :3, 2:39, :2048]
    assert_matches_reference(hidden, make_mask(3, 37).cuda(), torch.bfloat16)
    layers = [hidden[0], hidden[1].transpose(1, 2).contiguous().transpose(1, 2), hidden[2].contiguous()]
    assert_matches_reference(layers, make_mask(3, 37).cuda(), torch.bfloat16)


def test_kernels_compile_for_hopper_with_16_byte_vector_accesses():
    """No GPU needed: Triton's ahead-of-time path compiles both kernels for sm_90 (H100/H200) with the
    launcher's GPU block sizes, and the PTX reads H rows and writes the gradient 16 bytes at a time
    (the interpreter checks the arithmetic, not what the GPU compiler makes of it)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = REPO / "tests" / "support" / "kernel_ptx.py"
    p = subprocess.run([sys.executable, str(script), "--arch", "90"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert set(report) == {"fwd_bf16", "fwd_fp32", "bwd_bf16", "bwd_fp32"}
    for name, r in report.items():
        assert r["cubin_bytes"] > 0, name
        assert r["ops"].get("ld.global.v4.b32", 0) > 0, (name, r["ops"])
        assert r["ops"].get("ld.global.b16", 0) <= 1, (name, r["ops"])    # no per-element bf16 loads of H
        if name.startswith("bwd"):
            assert r["ops"].get("st.global.v4.b32", 0) > 0, (name, r["ops"])
