"""The one rule that picks an implementation for every kernel in nanollama.kernels.

NANOLLAMA_KERNELS=auto (default): Triton on CUDA tensors, the eager reference elsewhere.
NANOLLAMA_KERNELS=triton: Triton always; on CPU tensors that needs Triton's interpreter, which
    must be switched on (TRITON_INTERPRET=1) before triton is first imported.
NANOLLAMA_KERNELS=reference: the eager reference always.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

MODES = ("auto", "triton", "reference")


def mode() -> str:
    """The dispatch mode from the environment (read on every call, so tests can change it)."""
    value = os.environ.get("NANOLLAMA_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"NANOLLAMA_KERNELS must be one of {', '.join(MODES)}; got {value!r}")
    return value


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors, False for the eager reference."""
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
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return True
