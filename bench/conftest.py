"""pytest settings for bench/: collect bench_*.py files and make `harness` importable.

Run with `pytest bench --benchmark-only` (conventions in bench/README.md).
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # `from harness import measure` in every bench_*.py
    sys.path.insert(0, str(BENCH_DIR))


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect bench_*.py as test modules (pyproject's python_files names only test_*.py)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in parent.config.getini("python_files")):
        return None  # already collected by pytest's own rule: collecting twice would run it twice
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on the CPU)")
