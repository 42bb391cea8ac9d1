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


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run kernels with these versions (None: it can)."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        # numpy 2.4 refuses int() of a 1-element array, which these interpreters do for every loop
        # bound (triton-lang/triton#9171, fixed in Triton 3.7)
        return (
            f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version}: "
            "install 'numpy<2.4' or 'triton>=3.7'"
        )
    return None


@functools.cache
def _interpreter_problem_here() -> str | None:
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors, False for the eager reference.

    Raises RuntimeError when NANOLLAMA_KERNELS=triton cannot be honoured (no triton; CPU tensors
    without the interpreter, or with an interpreter that cannot run here).
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
    if not on_cuda and (problem := _interpreter_problem_here()):
        raise RuntimeError(f"NANOLLAMA_KERNELS=triton on CPU tensors: {problem}")
    return True
