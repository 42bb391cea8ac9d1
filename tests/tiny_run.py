"""Tiny CPU trainings for the tests: shared overrides of configs/gssm/debug.yaml, and a trained run
directory for the generation and length-evaluation tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from nanollama.observe.metrics import MetricsFile
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


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until a training process started with Popen has logged `n` records (or fail when it exits)."""
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(metrics.read()) >= n:
                return
        except ValueError:  # a line caught mid-write
            pass
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps within {timeout}s (exit {proc.poll()})")
