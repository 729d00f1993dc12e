"""Benchmark the decorrelation loss: Triton kernel vs eager and torch.compile'd reference.

For each size and pass (forward, backward, full = fwd+bwd): median time (triton.testing.do_bench),
peak memory above the inputs (torch.cuda.max_memory_allocated), the bytes-moved floor and the
achieved fraction of the device's measured copy bandwidth. One CSV row per measurement, with
the GPU name and versions.

Memory on any device, CPU included (trainer.kernels.memory.AllocationTracker, not for compile):
alloc_mib, the peak of what the pass allocates; extra_mib, that minus the gradients it returns
(L*B*T*D elements for backward and full); held_mib (backward rows): in the backward of a chain
of L layers (h_l = tanh(h_{l-1}), the loss on every h_l, as on the model's hidden states), the
most alive at a layer beyond the loss's gradients of the layers below and that layer's own.

Bytes floor: what any implementation must move. Forward reads the BOS row and the P prefix
rows of every (l, b) once; backward reads them again and writes the whole gradient (zeros
off the prefix included) once. Transcript/padding rows need not be read.

    python bench/bench_decorrelation.py --csv decorrelation.csv        # GPU: Llama-3.2-3B sizes
    python bench/bench_decorrelation.py --sweep                        # GPU: try block sizes
    python bench/bench_decorrelation.py                                # no GPU: interpreter smoke run
    python bench/bench_decorrelation.py --no-smoke --layers 6 --dim 512 --batch 4 --prefix 100
                                                                       # no GPU: memory columns at a small size
"""
import argparse
import csv
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when kernels are decorated: before any triton import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from trainer.kernels import decorrelation_loss, decorrelation_loss_reference  # noqa: E402
from trainer.kernels import decorrelation_triton  # noqa: E402
from trainer.kernels.memory import AllocationTracker  # noqa: E402

MODES = ("forward", "backward", "full")
IMPLS = ("triton", "eager", "compile")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=27, help="number of layers L (Llama-3.2-3B: hidden_states[1:28])")
    p.add_argument("--dim", type=int, default=3072, help="hidden size D")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32], help="batch sizes B")
    p.add_argument("--prefix", type=int, nargs="+", default=[100, 300, 600], help="prefix lengths P after BOS")
    p.add_argument("--transcript", type=int, default=32, help="transcript+padding tokens after the prefix (T = 1+P+this)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="hidden-state dtype")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="implementations to run (default: all; on CPU all but compile)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="passes to time")
    p.add_argument("--csv", type=Path, default=None, help="append rows to this CSV file (always printed too)")
    p.add_argument("--sweep", action="store_true", help="GPU: time Triton block-size candidates on the largest size")
    p.add_argument("--smoke", action="store_true", help="tiny size (implied without CUDA unless --no-smoke)")
    p.add_argument("--no-smoke", action="store_true",
                   help="without CUDA, run the sizes given instead of the tiny one (interpreted: keep them small)")
    return p.parse_args()


def make_inputs(L, B, P, T, D, dtype, device):
    """A list of L leaves [B, T, D], as transformers returns hidden_states, and the prefix mask."""
    g = torch.Generator(device=device).manual_seed(0)
    layers = [torch.randn(B, T, D, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(L)]
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, 1:1 + P] = True
    return layers, mask


def timed_ms(fn, grads, device) -> float:
    """Median milliseconds. do_bench on GPU; a wall-clock median under the interpreter."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")
    runs = []
    for _ in range(3):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(runs)


def peak_mib(fn, device) -> float:
    """Peak allocation above what was live before fn (inputs, and the graph for backward)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def tracked_mib(fn) -> float:
    """Peak MiB of the storages fn allocates (AllocationTracker: any device)."""
    with AllocationTracker() as t:
        fn()
    return t.peak / 2**20


def held_mib(fn, L, B, T, D, dtype, device) -> float:
    """In a layer chain's backward, the most MiB alive beyond what must be: at layer l, the loss's
    gradients of layers 0..l-1 (not reached yet) and layer l's own (accumulated) gradient."""
    x = torch.randn(B, T, D, device=device, dtype=dtype, requires_grad=True)
    layers, h = [], x
    for _ in range(L):
        h = torch.tanh(h)  # its backward saves only its output
        layers.append(h)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, 1:T // 2] = True
    loss = fn(layers, mask)
    unit = B * T * D * x.element_size()
    held = []

    def at(l):
        def hook(grad):
            if device.type != "cuda":
                gc.collect()  # the Triton interpreter holds a launch's arguments in a reference cycle
            held.append(t.live - (l + 1) * unit)
        return hook

    for l, h in enumerate(layers):
        h.register_hook(at(l))
    with AllocationTracker() as t:
        loss.backward()
    return max(held) / 2**20


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6


def floor_bytes(mode, L, B, P, T, D, elem) -> int:
    read = L * B * (1 + P) * D * elem
    write = L * B * T * D * elem
    return {"forward": read, "backward": read + write, "full": 2 * read + write}[mode]


def loss_fns(impls):
    fns = {}
    if "triton" in impls:
        fns["triton"] = lambda h, m: decorrelation_loss(h, m, impl="triton")
    if "eager" in impls:
        fns["eager"] = decorrelation_loss_reference
    if "compile" in impls:
        torch._dynamo.config.recompile_limit = 64  # one graph per (B, P) size
        fns["compile"] = torch.compile(decorrelation_loss_reference, dynamic=False)
    return fns


def measure(fn, mode, layers, mask, device, track=True):
    """(ms, peak MiB, tracked alloc MiB) of one pass."""
    if mode == "forward":
        run = lambda: fn(layers, mask)  # noqa: E731
    elif mode == "full":
        run = lambda: fn(layers, mask).backward()  # noqa: E731
    else:
        loss = fn(layers, mask)
        run = lambda: loss.backward(retain_graph=True)  # noqa: E731
    run()  # compile / warm up
    for h in layers:
        h.grad = None
    mem = peak_mib(run, device)
    for h in layers:
        h.grad = None
    alloc = tracked_mib(run) if track else float("nan")
    for h in layers:
        h.grad = None
    return timed_ms(run, layers, device), mem, alloc


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or (device.type != "cuda" and not args.no_smoke)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    L, D, batches, prefixes = args.layers, args.dim, args.batch, args.prefix
    impls = args.impls or [i for i in IMPLS if device.type == "cuda" or i != "compile"]  # inductor's CPU build is slow
    if smoke:
        L, D, batches, prefixes = 2, 96, [2], [12]
        if device.type != "cuda":
            print("# smoke mode on CPU under TRITON_INTERPRET=1: timings are meaningless, this only checks "
                  "that every path runs", file=sys.stderr)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu(interpreter)"
    bw = copy_bandwidth(device)
    print(f"# {gpu}: copy bandwidth {bw:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}, "
          f"cuda {torch.version.cuda}", file=sys.stderr)

    if args.sweep and device.type == "cuda":
        sweep(L, max(batches), max(prefixes), args.transcript, D, dtype, device)
        return

    fields = ["gpu", "torch", "triton", "cuda", "impl", "mode", "L", "B", "P", "T", "D", "dtype",
              "ms", "peak_mib", "alloc_mib", "extra_mib", "held_mib", "floor_bytes", "gb_s", "frac_copy_bw"]
    new_file = args.csv is not None and not args.csv.exists()
    out = open(args.csv, "a", newline="") if args.csv else None
    writers = [csv.DictWriter(sys.stdout, fields)] + ([csv.DictWriter(out, fields)] if out else [])
    writers[0].writeheader()
    if new_file:
        writers[1].writeheader()
    fns = loss_fns(impls)
    for B in batches:
        for P in prefixes:
            T = 1 + P + args.transcript
            layers, mask = make_inputs(L, B, P, T, D, dtype, device)
            for name, fn in fns.items():
                track = name != "compile"  # a dispatch mode around a compiled graph measures dynamo
                for mode in args.modes:
                    held = float("nan")
                    try:
                        ms, mem, alloc = measure(fn, mode, layers, mask, device, track)
                        if mode == "backward" and track:
                            held = held_mib(fn, L, B, T, D, dtype, device)
                    except torch.cuda.OutOfMemoryError:
                        ms, mem, alloc = float("nan"), float("inf"), float("inf")
                        torch.cuda.empty_cache()
                    nbytes = floor_bytes(mode, L, B, P, T, D, layers[0].element_size())
                    grads = 0 if mode == "forward" else L * B * T * D * layers[0].element_size() / 2**20
                    row = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                               impl=name, mode=mode, L=L, B=B, P=P, T=T, D=D, dtype=args.dtype,
                               ms=f"{ms:.4f}", peak_mib=f"{mem:.1f}", alloc_mib=f"{alloc:.2f}",
                               extra_mib=f"{alloc - grads:.2f}", held_mib=f"{held:.2f}", floor_bytes=nbytes,
                               gb_s=f"{nbytes / ms / 1e6:.1f}", frac_copy_bw=f"{nbytes / ms / 1e6 / bw:.3f}")
                    for w in writers:
                        w.writerow(row)
            del layers, mask
    if out:
        out.close()


def sweep(L, B, P, transcript, D, dtype, device):
    """Time (BLOCK_S, BLOCK_D, num_warps) candidates per pass; copy the winner into GPU_BLOCKS."""
    T = 1 + P + transcript
    layers, mask = make_inputs(L, B, P, T, D, dtype, device)
    fn = lambda h, m: decorrelation_loss(h, m, impl="triton")  # noqa: E731
    candidates = [(8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8), (64, 64, 4), (16, 128, 4)]
    default = dict(decorrelation_triton.GPU_BLOCKS)
    for which, mode in (("fwd", "forward"), ("bwd", "backward")):
        for cand in candidates:
            decorrelation_triton.GPU_BLOCKS[which] = cand
            ms, _, _ = measure(fn, mode, layers, mask, device, track=False)
            nbytes = floor_bytes(mode, L, B, P, T, D, layers[0].element_size())
            print(f"{which} BLOCK_S,BLOCK_D,warps={cand}: {ms:.4f} ms  {nbytes / ms / 1e6:.0f} GB/s"
                  + ("  (default)" if cand == default[which] else ""))
        decorrelation_triton.GPU_BLOCKS[which] = default[which]


if __name__ == "__main__":
    main()
