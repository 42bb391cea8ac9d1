"""Report build time (python -m nanollama.report) for a synthetic sweep of 100 runs x 10k steps (issue 16).

The sweep: a launcher log directory of 25 widths x 4 seeds, each run logging every step for 10,000
steps (10k train records with lr, grad norm, tokens/s, MFU/HFU, memory) and evaluating every 500
(nanollama.report.synthetic.write_sweep; ~290 MB of metrics.jsonl, written once per session).
NANOLLAMA_BENCH_REPORT=RUNSxSTEPS changes the size (e.g. 10x1000 for a quick look).

Group report-sweep:
  [downsampled]  read + figures + the HTML page, the default per-trace budget (min/max buckets: 200
                 points per trace at 100 runs); extra_info: the page's MB, traces and points drawn.
  [full]         the same with every point kept (max_points=1e9): what downsampling saves, mostly in
                 the page's size and so in the browser (the build itself is dominated by reading JSON).
No scaling fit (--no-fit): that is bench_scaling.py's, plus gather's config loads.
One round each: a build is tens of seconds on the 2-core VM, so harness.measure's warm-up, memory pass
and 3+ rounds would take minutes (CPU code: the device is irrelevant).

Measured (2026-12-01, the 2-core development VM shared with 7 others, load average ~2-3, 1 thread,
one round): see bench/results/report.md.
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("plotly", reason="the report needs plotly: pip install 'nanollama[report]'")

from nanollama.analysis.interactive import page  # noqa: E402
from nanollama.report.figures import build  # noqa: E402
from nanollama.report.read import read  # noqa: E402
from nanollama.report.synthetic import write_sweep  # noqa: E402

RUNS, STEPS = (int(v) for v in os.environ.get("NANOLLAMA_BENCH_REPORT", "100x10000").split("x"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    seeds = (0, 1, 2, 3) if RUNS % 4 == 0 else (0,)
    dims = tuple(16 + 8 * i for i in range(RUNS // len(seeds)))  # head_dim = dim / 4 heads stays even
    start = time.perf_counter()
    log = write_sweep(tmp_path_factory.mktemp("report") / "sweep", dims, seeds, steps=STEPS, log_every=1,
                      eval_every=max(STEPS // 20, 1))  # fmt: skip
    return log, time.perf_counter() - start


@pytest.mark.parametrize("variant", ["downsampled", "full"])
def test_report_build(benchmark, sweep, variant):
    """Seconds to read the sweep, build every figure and render the self-contained page."""
    benchmark.group = "report-sweep"
    log, written_s = sweep
    max_points = None if variant == "downsampled" else 10**9
    parts = {}

    def run():
        t0 = time.perf_counter()
        sections = read([log])
        t1 = time.perf_counter()
        figs, _ = build(sections, max_points, fit=False)
        t2 = time.perf_counter()
        html = page(figs, "bench")
        parts.update(read_s=t1 - t0, figures_s=t2 - t1, html_s=time.perf_counter() - t2, figs=figs, mb=len(html) / 1e6)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    traces = sum(len(f.data) for f in parts["figs"].values())
    points = sum(len(t.x) for f in parts["figs"].values() for t in f.data if getattr(t, "x", None) is not None)
    benchmark.extra_info.update(
        runs=RUNS, steps=STEPS, variant=variant, figures=len(parts["figs"]), traces=traces, points=points,
        page_mb=round(parts["mb"], 2), read_s=round(parts["read_s"], 2), figures_s=round(parts["figures_s"], 2),
        html_s=round(parts["html_s"], 2), sweep_written_s=round(written_s, 1), device="cpu",
    )  # fmt: skip
    assert traces > RUNS  # a build that drew nothing would time nothing
