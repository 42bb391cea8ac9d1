"""`python -m nanollama.report RUN_DIR|LOG_DIR... -o report.html [--png DIR]`: one self-contained HTML report.

Run directories are drawn together; each launcher log directory (tasks.jsonl) gets its own section
with one line per task coloured by grid point, a table of final losses and its scaling fit. The page
embeds plotly.js, so it opens offline. A path without metrics is refused in one line (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time

from nanollama.analysis import interactive
from nanollama.report.figures import build
from nanollama.report.read import ReportError, read


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m nanollama.report", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|LOG_DIR", help="run directories and launcher log directories")
    p.add_argument("-o", "--out", default="report.html", help="the HTML file to write (default report.html)")
    p.add_argument("--png", metavar="DIR", default=None, help="also write each figure as PNG here (kaleido)")
    p.add_argument("--max-points", type=int, default=None, help="points per trace (default: by the number of runs)")
    p.add_argument("--no-fit", action="store_true", help="skip the sweeps' scaling fits")
    p.add_argument("--title", default=None, help="the page title (default: the paths)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.max_points is not None and args.max_points < 10:
        print(f"error: --max-points must be at least 10, got {args.max_points}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        sections = read(args.paths)
        figs, notes = build(sections, args.max_points, fit=not args.no_fit)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # plotly missing: the one line says what to install
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    runs = sum(len(s.runs) for s in sections)
    out = interactive.write_html(figs, args.out, args.title or "nanollama report: " + ", ".join(args.paths), notes)
    took = time.perf_counter() - start
    print(f"wrote {out}: {len(figs)} figures of {runs} run{'' if runs == 1 else 's'} in {took:.1f} s")
    if args.png is not None:
        print(interactive.write_png(figs, args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
