"""The human log of a run: stdout and run_dir/train.log, and how its lines are written."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from nanollama.train.progress import format_eta

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


def format_train(r: dict, steps: int) -> str:
    """The line of one logged training step (r: its metrics record, with eta_s)."""
    mfu = f" | mfu {r['mfu']:.1%}" if r["mfu"] is not None else ""
    return (
        f"step {r['step']:>6}/{steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
        f"grad_norm {r['grad_norm']:.3f} | tok/s {r['tokens_per_s']:,.0f}{mfu} | eta {format_eta(r['eta_s'])}"
    )


def warmup_warning(optim, steps: int) -> str:
    """Why a warm-up as long as the run is a mistake, and what to set instead."""
    return (
        f"warning: optim.warmup={optim.warmup} >= steps={steps}: the learning rate rises for the "
        f"whole run and never reaches optim.lr{'' if optim.schedule == 'constant' else ' nor decays'} "
        f"(lower optim.warmup, e.g. optim.warmup={max(steps // 10, 1)})"
    )
