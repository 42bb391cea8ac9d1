"""Compile the scan kernels for an H100/H200 (sm_90) without a GPU, every flag combination; print "ok".

Run by test_scan.py in a subprocess with TRITON_INTERPRET unset (the interpreter accepts code the real
compiler rejects, e.g. tuple-valued associative scans it cannot lower). Arguments are specialised as a
launch would: unit channel strides, 16-divisible pointers.
"""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanollama.kernels import _scan_triton


def compile_kernel(kernel, dtype: str, num_warps: int = 4, num_stages: int = 1, **flags) -> int:
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in flags:
            signature[name], constexprs[name] = "constexpr", flags[name]
        elif name not in ("T", "C", "SEG") and not name.startswith("stride"):  # the tensors
            signature[name] = f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride") and name.endswith("_c"):
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    ).asm["ptx"]
    return len(ptx.splitlines())


if __name__ == "__main__":
    for dtype in ("bf16", "fp32"):
        for has_h0 in (False, True):
            for log in (False, True):
                for write_h, write_prod in ((True, False), (False, True)):  # one pass; a segment split's first pass
                    flags = dict(HAS_H0=has_h0, LOG=log, WRITE_H=write_h, WRITE_PROD=write_prod)
                    compile_kernel(_scan_triton._scan_fwd_kernel, dtype, **flags, BLOCK_T=64, BLOCK_C=32)
            for write, write_prod in ((True, False), (False, True)):
                flags = dict(HAS_H0=has_h0, WRITE_GRADS=write, WRITE_PROD=write_prod)
                compile_kernel(_scan_triton._scan_bwd_kernel, dtype, **flags, BLOCK_T=64, BLOCK_C=32)
    # the tiles bench_scan sweeps (software-pipelined loads included)
    for block_t, block_c, warps, stages in [(128, 32, 4, 3), (128, 64, 8, 3), (256, 32, 8, 2), (32, 32, 2, 3)]:
        tile = dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=warps, num_stages=stages)
        fwd_flags = dict(HAS_H0=True, LOG=False, WRITE_H=True, WRITE_PROD=False)
        compile_kernel(_scan_triton._scan_fwd_kernel, "bf16", **fwd_flags, **tile)
        compile_kernel(_scan_triton._scan_bwd_kernel, "bf16", HAS_H0=True, WRITE_GRADS=True, WRITE_PROD=False, **tile)
    print("ok")
