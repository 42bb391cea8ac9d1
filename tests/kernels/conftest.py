"""Kernel tests: Triton runs under its interpreter on the CPU.

triton.jit picks the interpreter when it decorates a kernel, so TRITON_INTERPRET=1 must be set
before nanollama.kernels is first imported. The root tests/conftest.py does that for the whole
suite; this file repeats it (setdefault) so tests/kernels also works as its own rootdir. On a
machine with a GPU the kernels run for real on CUDA tensors.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the kernel tests put their tensors: the real GPU when there is one, else the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def triton_kernels(monkeypatch):
    """Force the Triton path (NANOLLAMA_KERNELS=triton) for one test; skip where triton is missing."""
    pytest.importorskip("triton")
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton kernels were defined")
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    yield
