"""python -m nanollama.track wandb|tensorboard RUN_DIR|LOG_DIR... [--offline] [--project P] [--entity E] [--group G]

Replays run directories (a launcher log directory: each task's) into wandb runs or RUN_DIR/tb event
files, sending only what the last upload did not. Bad input: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanollama.observe.metrics import read_records
from nanollama.observe.trackers import INSTALL
from nanollama.track.upload import TrackError, targets, upload_tensorboard, upload_wandb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanollama.track", description=__doc__.splitlines()[0])
    parser.add_argument("tracker", choices=["wandb", "tensorboard"])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or launcher log directories")
    parser.add_argument("--offline", action="store_true", help="wandb: local run directories for a later `wandb sync`")
    parser.add_argument("--project", default=None, help="wandb project (default: the run's log.wandb.project)")
    parser.add_argument("--entity", default=None, help="wandb entity (default: the account's)")
    parser.add_argument("--group", default=None, help="wandb group (default: the sweep's name)")
    parser.add_argument("--wandb-dir", type=Path, default=None, help="where offline runs go (default: each RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        found = targets(args.paths)
    except TrackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with_metrics = [t for t in found if read_records(t.run_dir / "metrics.jsonl")]
    for t in found:
        if t not in with_metrics:
            print(f"{t.run_dir}: no metrics yet, skipped")
    if not with_metrics:
        print(f"error: no metrics in {', '.join(map(str, args.paths))} (no metrics.jsonl records)", file=sys.stderr)
        return 2
    if args.tracker == "tensorboard":
        try:
            for t in with_metrics:
                print(upload_tensorboard(t))
        except ImportError:
            print(f"error: writing TensorBoard files needs tensorboard: {INSTALL}", file=sys.stderr)
            return 2
        return 0
    try:
        import wandb  # noqa: F401
    except ImportError:
        print(f"error: uploading to wandb needs wandb: {INSTALL}", file=sys.stderr)
        return 2
    from nanollama.track.upload import wandb_options

    code = 0
    for t in with_metrics:
        options = lambda t=t: wandb_options(t, project=args.project, entity=args.entity, group=args.group)
        try:
            print(upload_wandb(t, options, "offline" if args.offline else "online", args.wandb_dir))
        except Exception as e:  # wandb refused (no network, no login): the next run may still go
            print(f"{t.run_dir}: wandb failed ({type(e).__name__}: {e}); try --offline and `wandb sync` later")
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
