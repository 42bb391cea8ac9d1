"""bench/gpu_check.sh leaves a handful of files whatever happens (a remote call brings back only a few)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_out_of_time_check_still_packs_its_output(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "NANOLLAMA_GPU_CHECK_S": "3", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 1, res.stdout + res.stderr  # every stage skipped: not a pass
    assert sorted(p.name for p in out.iterdir()) == ["caches.tar.gz", "results.tar.gz", "summary.txt"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"env.txt", "gpu_tests.log", "bench_rope.log", "bench_attention.log"} <= names
    summary = (out / "summary.txt").read_text()
    assert "== gpu_tests.log" in summary and "skipped, out of time" in summary
    assert "torch" in summary  # the environment comes first
