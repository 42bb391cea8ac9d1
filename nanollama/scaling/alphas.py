"""`python -m nanollama.scaling.alphas NAME=LOG_DIR... [--out DIR]`: experiment 1's excess loss against alpha.

Each NAME=LOG_DIR is one arm (a launcher sweep over one data.gssm.nodes.<i>.alpha); prints a table per
arm (mean excess over seeds per alpha and width, the gzip reference) and writes DIR/alphas.json and
DIR/excess_vs_alpha.svg.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanollama.analysis.alphas import arm, figure_of
from nanollama.utils.fileio import write_atomic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanollama.scaling.alphas", description=__doc__.split("\n")[0])
    p.add_argument("arms", nargs="+", metavar="NAME=LOG_DIR")
    p.add_argument("--out", default=".", help="where alphas.json and excess_vs_alpha.svg go (default: here)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    arms = {}
    try:
        for spec in args.arms:
            name, sep, log_dir = spec.partition("=")
            if not sep:
                raise ValueError(f"{spec}: give each arm as NAME=LOG_DIR")
            arms[name] = arm(log_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, a in arms.items():
        for run_dir, why in a["left_out"]:
            print(f"left out: {run_dir}: {why}")
        print(f"{name}: {a['key']} ({a['log_dir']})")
        print(f"  {'alpha':>8} {'dim':>5} {'excess':>9} {'std':>8} {'seeds':>5} {'gzip':>8} {'gzip excess':>11}")
        for r in a["rows"]:
            print(
                f"  {r['alpha']:>8.3g} {r['dim']:>5} {r['excess_mean']:>9.4f} {r['excess_std']:>8.4f} "
                f"{r['seeds']:>5} {r['gzip_nats']:>8.4f} {r['gzip_excess']:>11.4f}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "alphas.json", json.dumps(arms, indent=1) + "\n")
    if any(a["rows"] for a in arms.values()):
        write_atomic(out / "excess_vs_alpha.svg", figure_of(arms))
    print(f"wrote {out / 'alphas.json'} and {out / 'excess_vs_alpha.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
