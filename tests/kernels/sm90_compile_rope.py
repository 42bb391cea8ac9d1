"""Compile the RoPE kernel for an H100/H200 (sm_90) without a GPU; print what the PTX holds as JSON.

Run by test_rope.py in a subprocess with TRITON_INTERPRET unset (the interpreter accepts code the
real compiler rejects). Arguments are specialised as Triton does at launch: unit strides along D,
16-divisible pointers and strides (Llama shapes), so the check sees the vector loads a launch gets.
"""

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanollama.kernels import _rope_triton

POINTERS = {"Q": "*bf16", "K": "*bf16", "Q_OUT": "*bf16", "K_OUT": "*bf16", "COS": "*fp32", "SIN": "*fp32"}
POINTERS["POS"] = "*i64"
FLAGS = ("HAS_POS", "INTERLEAVED", "CONJ", "BLOCK_T", "BLOCK_H", "BLOCK_HALF")


def compile_variant(has_pos: bool, interleaved: bool, conj: bool) -> dict:
    kernel = _rope_triton._rope_kernel
    signature, constexprs, attrs = {}, {}, {}
    constexprs.update(HAS_POS=has_pos, INTERLEAVED=interleaved, CONJ=conj, BLOCK_T=1, BLOCK_H=32, BLOCK_HALF=64)
    for index, name in enumerate(kernel.arg_names):
        if name in FLAGS:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.endswith("_d") and not name.startswith(("stride_cos", "stride_sin")):
            signature[name], constexprs[name] = "constexpr", 1  # unit stride along D
        else:
            signature[name] = "i32"
            if name.startswith("stride") and not name.startswith("stride_pos") or name == "HALF":
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    return {
        "v4_loads": ptx.count("ld.global.v4"),
        "v4_stores": ptx.count("st.global.v4"),
        "lines": len(ptx.splitlines()),
    }


if __name__ == "__main__":
    variants = {f"pos{int(p)}-inter{int(i)}-conj{int(c)}": (p, i, c) for p, i, c in [(1, 0, 0), (0, 1, 1)]}
    print(json.dumps({name: compile_variant(*flags) for name, flags in variants.items()}))
