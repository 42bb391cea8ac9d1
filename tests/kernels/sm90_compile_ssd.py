"""Compile the SSD kernels for an H100/H200 (sm_90) without a GPU, checking each fits a block's shared memory;
print "ok". `--all`: every flag combination and both dtypes (about 4 minutes on 2 cores).

Run by test_ssd_triton.py in a subprocess with TRITON_INTERPRET unset (the interpreter accepts code the real
compiler rejects). Tiles as _ssd_launch picks them at Mamba-2's sizes (L = 64, P = 64, N = 128).
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanollama.kernels import _ssd_triton

FLOAT32 = {"A", "STATES", "DSTATES", "DDT", "DB", "DC", "DA"}  # pointers that are float32 whatever x's dtype
INTS = {"T", "H", "P", "N", "L", "K", "HPG"}


SHARED_MAX = 227 * 1024  # an H100/H200 block's shared memory: a kernel over it compiles but cannot launch


def compile_kernel(kernel, dtype: str, num_warps: int = 4, num_stages: int = 1, **flags) -> int:
    """Compile for sm_90 (ptxas included); returns the kernel's shared memory in bytes."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in flags:
            signature[name], constexprs[name] = "constexpr", flags[name]
        elif name not in INTS and not name.startswith("stride"):  # the tensors
            signature[name] = "*u8" if name == "RST" else "*fp32" if name in FLOAT32 else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    shared = compiled.metadata.shared
    assert shared <= SHARED_MAX, f"{kernel.__name__} {dtype} {flags}: {shared} bytes of shared memory"
    print(f"{kernel.__name__} {dtype} {flags}: {shared} bytes shared", flush=True)
    return shared


if __name__ == "__main__":
    # default: 16-bit x with resets (the fullest code path), 6 compiles; --all: both dtypes, every flag
    k = _ssd_triton
    every = "--all" in sys.argv
    for dtype in ("bf16", "fp32") if every else ("bf16",):
        ieee = dtype == "fp32"
        for reset in (False, True) if every else (True,):
            tile = dict(IEEE=ieee, HAS_RESET=reset, BLOCK_L=64, BLOCK_P=64, BLOCK_N=64, num_warps=4, num_stages=2)
            for from_start in (False, True):
                compile_kernel(k._ssd_state_kernel, dtype, FROM_START=from_start, **tile)
            compile_kernel(k._ssd_output_kernel, dtype, **tile)
            carries = ((False, False), (True, False), (True, True)) if every else ((True, False), (True, True))
            for has_h0, reverse in carries:
                flags = dict(HAS_H0=has_h0, REVERSE=reverse, HAS_RESET=reset, BLOCK_L=64, BLOCK=1024)
                compile_kernel(k._ssd_carry_kernel, dtype, **flags)
            # the backward holds all of P: _ssd_launch.supports' largest (rows, head dim) tiles
            for block_l, block_p in ((64, 64), (64, 128), (128, 64)) if every else ((64, 64),):
                bwd = dict(IEEE=ieee, HAS_RESET=reset, BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_N=32, num_warps=8)
                compile_kernel(k._ssd_bwd_kernel, dtype, **bwd)
                if block_l > 64:
                    compile_kernel(k._ssd_output_kernel, dtype, **{**tile, "BLOCK_L": block_l})
    print("ok")
