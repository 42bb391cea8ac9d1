"""Experiment 1's smoke pipeline end to end: both arms through the launcher (bash), then the alpha table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanollama.scaling.alphas import main as alphas

ROOT = Path(__file__).parents[1]
EXP1 = ROOT / "configs" / "experiments" / "exp1"


@pytest.mark.slow
def test_exp1_smoke_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for arm in ("x", "z"):  # the smoke files as shipped, shortened to 20 steps; a bash launch execs run.sh
        args = [str(EXP1 / f"smoke_{arm}.yaml"), f"log_dir={tmp_path / arm}", "steps=20", "eval.every=20",
                "checkpoint.every=20", "progress_every=0"]  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "nanollama.launcher", *args], env=env, cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert alphas([f"alpha_X={tmp_path / 'x'}", f"alpha_Z={tmp_path / 'z'}", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "alphas.json").read_text())
    assert (
        result["alpha_X"]["key"] == "data.gssm.nodes.1.alpha" and result["alpha_Z"]["key"] == "data.gssm.nodes.0.alpha"
    )
    for arm in result.values():
        assert [r["alpha"] for r in arm["rows"]] == [1e-3, 3e-2, 1.0] and not arm["left_out"]
        assert all(r["excess_mean"] > 0 and r["gzip_excess"] > 0 for r in arm["rows"])
    assert (tmp_path / "out" / "excess_vs_alpha.svg").exists()
