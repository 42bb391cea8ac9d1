"""The one rule that picks an implementation for every kernel in nanollama.kernels.

NANOLLAMA_KERNELS=auto (default): Triton on CUDA tensors, the eager reference elsewhere.
NANOLLAMA_KERNELS=triton: Triton always; on CPU tensors that needs Triton's interpreter, which
    must be switched on (TRITON_INTERPRET=1) before the kernels are defined (before importing
    nanollama.kernels), since triton.jit picks the interpreter when it decorates a function.
NANOLLAMA_KERNELS=reference: the eager reference always.

Under torch.compile the environment is read once, when a function is traced: the choice is baked
into the graph (the settings functions are marked constant so Dynamo does not trace os.environ).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["MODES", "interpreter_on", "mode", "module_found", "triton_available", "use_triton"]

MODES = ("auto", "triton", "reference")


@torch.compiler.assume_constant_result
def mode() -> str:
    """The dispatch mode from the environment (read on every eager call, so tests can change it)."""
    value = os.environ.get("NANOLLAMA_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"NANOLLAMA_KERNELS must be one of {', '.join(MODES)}; got {value!r}")
    return value


@functools.cache
def module_found(name: str) -> bool:
    """Whether `name` can be imported, looked up once. Callers that torch.compile may trace wrap it in
    a function marked assume_constant_result (as triton_available is): Dynamo refuses to trace find_spec."""
    return importlib.util.find_spec(name) is not None


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    return module_found("triton")


@torch.compiler.assume_constant_result
def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors, False for the eager reference.

    Raises RuntimeError when NANOLLAMA_KERNELS=triton cannot be honoured (no triton; CPU tensors
    without the interpreter).
    """
    chosen = mode()
    if chosen == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("NANOLLAMA_KERNELS=triton but triton is not installed (pip install triton)")
    if not on_cuda and not interpreter_on():
        raise RuntimeError(
            "NANOLLAMA_KERNELS=triton on CPU tensors needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing nanollama.kernels"
        )
    return True
