"""`python -m nanollama.scaling LOG_DIR... [--form ND] [--out DIR]`: the scaling law of launcher sweeps.

Gathers the finished runs of any mix of sweeps (nanollama.analysis.gather: N non-embedding parameters,
D tokens), lists the runs left out and why, fits L = E + A / N^alpha + B / D^beta with E the runs'
Bayes-optimal loss when every run has one (GSSM data; --fit-e to fit E anyway), prints the law with
bootstrap intervals (clusters: the seeds of one configuration) and writes DIR/fit.json and SVG figures,
plus the same figures interactive in DIR/fit.html (plotly installed) and as PNG (kaleido and Chromium).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nanollama.analysis import interactive
from nanollama.analysis.gather import gather
from nanollama.analysis.plots import scaling_figures
from nanollama.analysis.scaling import fit
from nanollama.utils.fileio import write_atomic


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m nanollama.scaling", description=__doc__.split("\n")[0])
    p.add_argument("log_dirs", nargs="+", metavar="LOG_DIR", help="launcher log directories (tasks.jsonl)")
    p.add_argument("--form", choices=["N", "D", "ND"], default="ND", help="the terms of the law (default ND)")
    p.add_argument("--out", default=None, help="where fit.json and the figures go (default: the first LOG_DIR)")
    p.add_argument("--tokens", choices=["auto", "seen", "unique"], default="auto", help="what D counts")
    p.add_argument("--fit-e", action="store_true", help="fit E (5 parameters) even when Bayes losses are known")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG export (kaleido starts a browser: seconds)")
    p.add_argument("--compute", type=float, nargs="*", default=[], help="FLOPs C for N*(C), D*(C) (form ND)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        got = gather(args.log_dirs, args.tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run_dir, why in got.left_out:
        print(f"left out: {run_dir}: {why}")
    runs = got.runs
    if not runs:
        print("error: no finished run to fit", file=sys.stderr)
        return 2
    points = np.array(got.points(), float)
    bayes = [r.bayes for r in runs]
    known = not args.fit_e and all(b is not None for b in bayes)
    clusters = np.unique([r.cluster for r in runs], return_inverse=True)[1]
    try:
        law = fit(points, np.array(bayes, float) if known else None, args.form, clusters=clusters, n_boot=args.boot,
                  level=args.level)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs ({len(got.left_out)} left out), N: non-embedding parameters, D: tokens ({args.tokens})")
    print(law.summary())
    out = {"fit": law.to_dict(), "left_out": [{"run_dir": r, "why": w} for r, w in got.left_out]}
    out["runs"] = [{k: v for k, v in asdict(r).items() if k not in ("cluster", "key")} for r in runs]
    if args.form == "ND":
        out["compute_optimal"] = law.compute_optimal(args.compute or [1e18, 1e20, 1e22])
        for c, n, d in zip(out["compute_optimal"]["C"], out["compute_optimal"]["N"], out["compute_optimal"]["D"]):
            print(f"  compute-optimal at C={c:.3g}: N*={n:.4g}, D*={d:.4g}")
    where = Path(args.out or args.log_dirs[0])
    where.mkdir(parents=True, exist_ok=True)
    write_atomic(where / "fit.json", json.dumps(out, indent=1) + "\n")
    floor = np.array(bayes, float) if known else None
    figs = scaling_figures(law, points[:, 0], points[:, 1], points[:, 2], floor)
    for name, svg in figs.items():
        write_atomic(where / f"{name}.svg", svg)
    print(f"wrote {where / 'fit.json'} and {len(figs)} SVG figures")
    try:
        plots = interactive.scaling_plotly(law, points[:, 0], points[:, 1], points[:, 2], floor)
    except ImportError as e:
        print(f"HTML and PNG skipped: {e}")
        return 0
    print(f"wrote {interactive.write_html(plots, where / 'fit.html', 'scaling fit: ' + ', '.join(args.log_dirs))}")
    if not args.no_png:
        print(interactive.write_png(plots, where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
