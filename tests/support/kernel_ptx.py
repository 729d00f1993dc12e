"""Compile the decorrelation kernels for an NVIDIA GPU on a machine without one (Triton's
ahead-of-time path: Python -> TTIR -> PTX -> cubin with the bundled ptxas) and print, as JSON,
the global load/store instructions of each kernel's PTX.

    python tests/support/kernel_ptx.py [--arch 90]       # must run without TRITON_INTERPRET=1

The arguments are specialised as Triton's JIT does for a real launch at Llama sizes: pointers
16-byte aligned and D (3072) divisible by 16; block sizes and warps are what the launcher's
block_sizes picks for the 'gpu' tiling.
"""
import argparse
import collections
import json
import os
import re
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter does not compile")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))     # the checkout

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from trainer.kernels import decorrelation_triton as dk  # noqa: E402

POINTERS = {
    "fwd": {"tab_ptr": "*i64", "h0_ptr": "H", "mask_ptr": "*u8", "cos_ptr": "*fp32", "rn_ptr": "*fp32",
            "kap_ptr": "*fp32"},
    "bwd": {"tab_ptr": "*i64", "h0_ptr": "H", "gtab_ptr": "*i64", "grad_ptr": "H", "mask_ptr": "*u8",
            "cos_ptr": "*fp32", "rn_ptr": "*fp32", "kap_ptr": "*fp32", "scale_ptr": "*fp32"},
}
KERNELS = {"fwd": dk._decorrelation_fwd_kernel, "bwd": dk._decorrelation_bwd_kernel}
DTYPES = {"bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}


def compile_kernel(which: str, dtype: str, arch: int, T: int = 333, D: int = 3072):
    fn = KERNELS[which]
    h_type, size = DTYPES[dtype]
    block_s, block_d, warps = dk.block_sizes(T, D, which, "gpu")
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        if name in POINTERS[which]:
            signature[name] = h_type if POINTERS[which][name] == "H" else POINTERS[which][name]
        elif name == "eps":
            signature[name] = "fp32"
        elif name in ("B", "T", "D"):
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
    constexprs = {"D_CONTIG": True, "VEC": 16 // size, "BLOCK_S": block_s, "BLOCK_D": block_d}
    if which == "bwd":
        constexprs["GVEC"] = 16 // size
    aligned = [n for n in fn.arg_names if n.endswith("_ptr")] + ["D"]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    args = p.parse_args()
    out = {}
    for which in KERNELS:
        for dtype in DTYPES:
            compiled = compile_kernel(which, dtype, args.arch)
            ptx = compiled.asm["ptx"]
            out[f"{which}_{dtype}"] = {
                "ops": dict(collections.Counter(re.findall(r"\b(?:ld|st)\.global[.\w]*", ptx))),
                "cubin_bytes": len(compiled.asm["cubin"]),
            }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
