"""Tiny CPU trainings for the tests: shared overrides of configs/gssm/debug.yaml, and a trained run
directory for the generation and length-evaluation tests."""

from __future__ import annotations

from pathlib import Path

from nanollama.train.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gssm" / "debug.yaml"
# The smallest training worth testing: a couple of seconds of compute per run.
TINY = {
    "model.dim": 32,
    "model.n_layers": 1,
    "model.max_seq_len": 32,
    "data.batch_size": 8,
    "data.seq_len": 16,
    "optim.warmup": 2,
    "log.every": 1,
    "eval.every": 0,
    "eval.batches": 2,
}


def tiny(changes: dict | None = None) -> list[str]:
    """TINY, with `changes` applied, as key=value command-line overrides."""
    return [f"{key}={value}" for key, value in {**TINY, **(changes or {})}.items()]


OVERRIDES = ["model.dim=32", "model.n_layers=1", "data.batch_size=8", "data.seq_len=16", "steps=5"]


def train_tiny_run(run_dir: Path) -> Path:
    """Train 5 steps in-process (a few seconds on the CPU) and return the run directory."""
    code = main([str(CONFIG), *OVERRIDES, f"run_dir={run_dir}", "device=cpu"])
    assert code == 0, f"training the tiny run failed with exit code {code}"
    return run_dir
