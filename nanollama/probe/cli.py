"""`python -m nanollama.probe RUN_DIR`: probe a training run's checkpoints for the GSSM hidden state.

Prints, per checkpoint, a table by hidden node and layer (accuracy, the exact ceiling and the
fraction of it reached, cross-entropies, belief R^2 and KL, the controls) and appends one record per
checkpoint x layer x node to RUN_DIR/probes.jsonl (or --out). Bad input: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from nanollama import config, data
from nanollama.probe.probing import format_over_steps, format_table, probe_run
from nanollama.probe.targets import ProbeError
from nanollama.runs import RunError
from nanollama.train.checkpoint import CheckpointError
from nanollama.utils import exit_codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanollama.probe", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a training run directory (config.yaml, checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="STEP, latest or all (default: latest)")
    parser.add_argument("--layers", default=None, help="embed, block indices, final_norm (comma-separated; all)")
    parser.add_argument("--sites", default="resid", help="comma-separated: resid, attn, mlp, state (default: resid)")
    parser.add_argument("--sequences", type=int, default=512, help="probing sequences, split by sequence (default 512)")
    parser.add_argument("--out", type=Path, default=None, help="records file (default: RUN_DIR/probes.jsonl)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--no-controls", action="store_true", help="skip the random-init and control-task probes")
    parser.add_argument("--quiet", action="store_true", help="no tables (records only)")
    args = parser.parse_args(argv)
    layers = None if args.layers is None else [s.strip() for s in args.layers.split(",") if s.strip()]
    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    start = time.perf_counter()
    print(f"probing {args.run_dir} on {torch.get_num_threads()} threads", file=sys.stderr)

    def show(step: int, scores: dict) -> None:
        if not args.quiet:
            print(format_table(step, scores), flush=True)

    try:
        records = probe_run(
            args.run_dir, args.checkpoint, layers, sites, args.sequences, args.device, args.out,
            controls=not args.no_controls, on_step=show,
        )  # fmt: skip
    except (ProbeError, RunError, config.ConfigError, data.DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    if not args.quiet and len({r["step"] for r in records}) > 1:
        print(format_over_steps(records))
    out = args.out or args.run_dir / "probes.jsonl"
    print(f"{len(records)} records appended to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return exit_codes.OK
