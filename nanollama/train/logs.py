"""The human log of a run: stdout and run_dir/train.log, and how its lines are written."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("nanollama")


def setup_logging(path: Path) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(path)):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def format_eval(r: dict) -> str:
    """'eval_loss 1.3013 | bayes_loss 1.2920 | excess_loss 0.0093', the oracle's fields only where known."""
    return " | ".join(f"{k} {r[k]:.4f}" for k in ("eval_loss", "bayes_loss", "excess_loss") if k in r)
