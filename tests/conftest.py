"""Shared test settings: the `gpu` marker skips cleanly where no CUDA device exists."""

import os
import tempfile

# Tests use tiny tensors: one thread per process avoids OpenMP oversubscription (several pytest
# processes and subprocess trainers share 2 cores), which made steps 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The attention backend choice is cached on disk: keep the tests' measurements out of ~/.cache.
os.environ.setdefault("NANOLLAMA_CACHE_DIR", tempfile.mkdtemp(prefix="nanollama-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run under Triton's interpreter, which must be switched on before
# triton is first imported (nanollama.kernels imports it): set it here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Whole files outside the quick inner loop (`pytest -m "not slow"`): each test starts a real Slurm
# or several processes. Single slow tests carry @pytest.mark.slow themselves.
SLOW_FILES = ("test_slurm.py",)


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)
