"""Evaluating saved checkpoints, against the Bayes-optimal loss where known.

    python -m nanollama.evaluate RUN_DIR                    the checkpoints marked pending evaluation
    python -m nanollama.evaluate RUN_DIR --latest           the latest checkpoint
    python -m nanollama.evaluate RUN_DIR --checkpoint STEP  one checkpoint, by step or by path
    ... --data DIR                                          on DIR's test split instead of the held-out batches

By default a checkpoint is scored on the run's held-out batches (the same fresh batches drawn from
the graph that training-time evaluation uses). `--data DIR` scores it on the test split of a data
directory written by `python -m nanollama.data.gssm` (from the run's own graph), every position of
every row, so that its eval_loss compares with the manifest's test_bayes_nll exactly.

One record per checkpoint is appended to RUN_DIR/evaluations.jsonl; a checkpoint that was pending
evaluation (checkpoint.eval_every) loses its mark, so that keep-last-k may delete it afterwards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nanollama import config, data, models
from nanollama.data.batch import Batch
from nanollama.data.gssm.reader import TokenFileDataset
from nanollama.data.gssm.stream import check_same_graph
from nanollama.data.heldout import HeldOut
from nanollama.observe.metrics import MetricsFile
from nanollama.runs import RunError, load_config, resolve_device
from nanollama.train import checkpoint
from nanollama.train.logs import format_eval
from nanollama.train.loss import lm_loss
from nanollama.utils import exit_codes


def select(run_dir: Path, which: str | None = None, latest: bool = False) -> list[Path]:
    """The checkpoints to evaluate: `which` (a step or a path), the latest, or those pending evaluation."""
    root = run_dir / "checkpoints"
    if latest:
        path = checkpoint.latest(root)
        if path is None:
            raise RunError(f"--latest: no complete checkpoint under {root}")
        return [path]
    if which is None:
        return checkpoint.pending_evaluation(root)
    path = checkpoint.step_dir(root, int(which)) if which.isdigit() else Path(which)
    if not (path / checkpoint.MARKER).is_file():
        steps = checkpoint.complete_steps(root)
        known = f"complete steps: {', '.join(map(str, steps))}" if steps else f"no complete checkpoint under {root}"
        raise RunError(f"--checkpoint {which}: {path} is not a complete checkpoint ({known})")
    return [path]


class TestSplit:
    """A data directory's test split as causal batches, with the manifest's Bayes-optimal NLL of it."""

    def __init__(self, path: Path, cfg, batch_size: int):
        source = data.build(cfg.data)
        gssm = getattr(source, "gssm", None)
        if gssm is None:
            raise RunError(f"--data: data.source={cfg.data.source} has no GSSM graph to check {path} against")
        self.dataset = TokenFileDataset(path, "test")
        manifest = self.dataset.manifest
        check_same_graph(manifest, gssm, path)
        max_len = getattr(cfg.model, "max_seq_len", None)
        if max_len is not None and manifest["seq_len"] > max_len:
            raise RunError(
                f"--data: {path} has rows of seq_len {manifest['seq_len']}, beyond the model's max_seq_len {max_len}"
            )
        self.bayes_loss = float(manifest["test_bayes_nll"])  # mean over targets 1..seq_len of every row
        self.batch_size = batch_size

    @torch.no_grad()
    def evaluate(self, loss_on) -> dict:
        total, count = 0.0, 0
        for lo in range(0, len(self.dataset), self.batch_size):
            rows = self.dataset.__getitems__(list(range(lo, min(lo + self.batch_size, len(self.dataset)))))
            batch = Batch(inputs=rows[:, :-1], targets=rows[:, 1:])
            total += float(loss_on(batch)) * batch.targets.numel()
            count += batch.targets.numel()
        eval_loss = total / count
        return {"eval_loss": eval_loss, "bayes_loss": self.bayes_loss, "excess_loss": eval_loss - self.bayes_loss}


def evaluate(
    run_dir: Path,
    which: str | None = None,
    latest: bool = False,
    data_dir: Path | None = None,
    batch_size: int = 32,
    device: str | None = "cpu",
) -> list[dict]:
    cfg = load_config(run_dir)
    paths = select(run_dir, which, latest)
    if not paths:
        return []
    dev = resolve_device(device)
    scorer = (
        TestSplit(data_dir, cfg, batch_size)
        if data_dir is not None
        else HeldOut(data.build(cfg.data), cfg.eval.batches)
    )
    model = models.build(cfg.model).eval()
    results = MetricsFile(run_dir / "evaluations.jsonl")
    records = []
    for path in paths:
        checkpoint.load_model(path, model)
        model.to(dev)
        scores = scorer.evaluate(lambda b: lm_loss(model, b.to(dev)))
        record = {"step": checkpoint.info(path)["step"], "checkpoint": path.name, **scores}
        if data_dir is not None:
            record["data"], record["split"] = str(data_dir), "test"
        results.write(record)
        pending = (path / checkpoint.EVAL_PENDING).exists()
        checkpoint.mark_evaluated(path)
        records.append({**record, "was_pending": pending})
        where = f" | {data_dir} test split" if data_dir is not None else ""
        print(f"step {record['step']}{where} | {format_eval(record)}")
    # Evaluated checkpoints beyond checkpoint.keep are no longer protected: apply keep-last-k now,
    # as the trainer would at its next save (which may never come once training has finished).
    if any(r["was_pending"] for r in records):
        checkpoint.prune(run_dir / "checkpoints", cfg.checkpoint.keep)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanollama.evaluate",
        description="Evaluate a run's checkpoints (by default those marked pending evaluation).",
    )
    parser.add_argument("run_dir", type=Path)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", metavar="PATH|STEP", help="evaluate this checkpoint (a step or a directory)")
    which.add_argument("--latest", action="store_true", help="evaluate the latest complete checkpoint")
    parser.add_argument(
        "--data", type=Path, metavar="DIR", help="score on DIR's test split (manifest test_bayes_nll) instead"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass with --data")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file():
        print(f"error: {args.run_dir} is not a run directory (no config.yaml)", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    try:
        records = evaluate(args.run_dir, args.checkpoint, args.latest, args.data, args.batch_size, args.device)
    except config.ConfigError as e:
        print(f"error: {args.run_dir / 'config.yaml'}: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except (RunError, data.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if not records:
        print("no checkpoint is pending evaluation (--latest or --checkpoint STEP evaluates one anyway)")
    return 0
