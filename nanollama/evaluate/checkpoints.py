"""Evaluating saved checkpoints on the run's held-out batches, against the Bayes-optimal loss where known.

`python -m nanollama.evaluate RUN_DIR` evaluates the checkpoints marked pending evaluation
(checkpoint.eval_every), appends one record per checkpoint to RUN_DIR/evaluations.jsonl and clears
their mark, so that keep-last-k may delete them afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanollama import config, data, models
from nanollama.data.heldout import HeldOut
from nanollama.observe.metrics import MetricsFile
from nanollama.runs import RunError, load_config
from nanollama.train import checkpoint
from nanollama.train.loss import lm_loss
from nanollama.train.trainer import format_eval
from nanollama.utils import exit_codes


def evaluate_pending(run_dir: Path) -> list[dict]:
    cfg = load_config(run_dir)
    held_out = HeldOut(data.build(cfg.data), cfg.eval.batches)
    model = models.build(cfg.model).eval()
    results = MetricsFile(run_dir / "evaluations.jsonl")
    records = []
    for path in checkpoint.pending_evaluation(run_dir / "checkpoints"):
        checkpoint.load_model(path, model)
        record = {"step": checkpoint.info(path)["step"], **held_out.evaluate(lambda t: lm_loss(model, t))}
        results.write(record)
        checkpoint.mark_evaluated(path)
        records.append(record)
        print(f"step {record['step']} | {format_eval(record)}")
    # Evaluated checkpoints beyond checkpoint.keep are no longer protected: apply keep-last-k now,
    # as the trainer would at its next save (which may never come once training has finished).
    if records:
        checkpoint.prune(run_dir / "checkpoints", cfg.checkpoint.keep)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanollama.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
        return exit_codes.BAD_INPUT
    try:
        records = evaluate_pending(args.run_dir)
    except (config.ConfigError, RunError, data.DataError) as e:
        print(f"error: {args.run_dir / 'config.yaml'}: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if not records:
        print("no checkpoint is pending evaluation")
    return 0
