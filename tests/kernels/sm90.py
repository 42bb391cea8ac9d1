"""Compiling kernels for sm_90 (H100/H200) without a GPU: the real Triton compiler and the ptxas it ships,
not the interpreter, run on one of the sm90_compile_*.py scripts beside this file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import nanollama


def compile_offline(script_name: str) -> str:
    """Run the script in a fresh interpreter (TRITON_INTERPRET=0) and return its stdout; skip where no
    offline CUDA compiler exists, fail on any other error."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name(script_name)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    # The package under test, wherever it is imported from (a worktree on PYTHONPATH, say).
    env["PYTHONPATH"] = os.pathsep.join([str(Path(nanollama.__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode and ("ptxas" in done.stderr and "not found" in done.stderr or "ImportError" in done.stderr):
        pytest.skip(f"no offline CUDA compiler here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
