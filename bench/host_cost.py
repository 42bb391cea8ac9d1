"""Host time per call of apply_rope and decode_attention with no-op kernels (the launch path's own cost).

    PYTHONPATH=. OMP_NUM_THREADS=1 TRITON_INTERPRET=1 NANOLLAMA_KERNELS=triton python bench/host_cost.py

The Triton kernels are replaced by stand-ins that do nothing, so what is timed is the Python and
dispatcher work around one launch: input checks, the autograd.Function, the torch op, output
allocation. Best of 5 runs of 200 calls each (shared machines are noisy: read the best).
"""

from __future__ import annotations

import time

import torch

from nanollama.kernels import _decode_triton, _rope_triton
from nanollama.kernels import decode as decode_mod
from nanollama.kernels import rope as rope_mod


class InterpretedFunction:  # the class name the CPU launchers check for
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def best_us(fn, calls: int = 200, runs: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    _rope_triton._rope_kernel = InterpretedFunction()
    _decode_triton._decode_split_kernel = _decode_triton._decode_reduce_kernel = InterpretedFunction()
    q = torch.randn(1, 64, 32, 128)
    k = torch.randn(1, 64, 8, 128)
    cos, sin = rope_mod.rope_frequencies(64, 128)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    with torch.no_grad():
        fwd = best_us(lambda: rope_mod.apply_rope(q, k, cos, sin))

    def fwd_bwd():
        q_out, k_out = rope_mod.apply_rope(qg, kg, cos, sin)
        torch.autograd.grad((q_out, k_out), (qg, kg), (q_out, k_out))

    both = best_us(fwd_bwd)
    dq = torch.randn(1, 32, 128)
    cache = torch.randn(1, 8, 8192, 128)
    lengths = torch.tensor([8000])
    decode = best_us(lambda: decode_mod.decode_attention(dq, cache, cache, lengths))
    print(f"rope fwd no-grad {fwd:.1f} us | rope fwd+grad {both:.1f} us | decode {decode:.1f} us")


if __name__ == "__main__":
    main()
