"""Helpers every kernel file shares, each written once: availability checks, integer block arithmetic
and the CUDA device guard. Triton itself is imported only by the kernel modules (_rope_triton.py,
_decode_triton.py), at the first launch; whether it is there is dispatch.triton_available's one check."""

from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

__all__ = ["cdiv", "constant_to_dynamo", "launch_device", "module_found", "pow2_at_least"]


def constant_to_dynamo(fn):
    """Mark `fn` as returning a constant under torch.compile, as torch.compiler.assume_constant_result does.

    That decorator imports torch._dynamo (about 1 s here), so importing the kernels would pay for it:
    we set the marker it sets instead (test_dispatch checks the two agree) and Dynamo reads it when
    a trace first meets `fn`. Needed for checks that call find_spec, which Dynamo refuses to trace
    (torch 2.11), and for the environment reads, which must not become guards on os.environ.
    """
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def module_found(name: str) -> bool:
    """Whether `name` can be imported, looked up once. Callers that torch.compile may trace wrap it in a
    function marked constant_to_dynamo: Dynamo refuses to trace find_spec."""
    return importlib.util.find_spec(name) is not None


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (plain int math: triton.next_power_of_2 is a ConstexprFunction in
    Triton 3.9 and costs ~4 us per host call here)."""
    return 1 << max(0, n - 1).bit_length()


def launch_device(t: torch.Tensor):
    """A context that makes t's CUDA device current (Triton launches on the current device); a no-op
    when it already is, or on the CPU: entering torch.cuda.device costs a few us per call."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
