"""A tiny trained GSSM run directory, shared by the generation and length-evaluation tests."""

from __future__ import annotations

from pathlib import Path

from nanollama.train import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gssm" / "debug.yaml"
OVERRIDES = ["model.dim=32", "model.n_layers=1", "data.batch_size=8", "data.seq_len=16", "steps=5"]


def train_tiny_run(run_dir: Path) -> Path:
    """Train 5 steps in-process (a few seconds on the CPU) and return the run directory."""
    code = main([str(CONFIG), *OVERRIDES, f"run_dir={run_dir}", "device=cpu"])
    assert code == 0, f"training the tiny run failed with exit code {code}"
    return run_dir
