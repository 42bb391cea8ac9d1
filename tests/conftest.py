"""Shared test settings: the `gpu` marker skips cleanly where no CUDA device exists."""

import os

# Tests use tiny tensors: one thread per process avoids OpenMP oversubscription (several pytest
# processes and subprocess trainers share 2 cores), which made steps 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
