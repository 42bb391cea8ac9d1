"""Interactive reports of runs and sweeps (plotly): `python -m nanollama.report RUN_DIR|LOG_DIR... -o report.html`.

    from nanollama.report import figures
    figs = figures("runs/debug")          # name -> plotly Figure
    figs["loss"].show()

read.py        run directories (metrics, probes, profiles) and launcher log directories, as Runs in Sections
figures.py     loss with the Bayes floor, excess (log-log), lr, grad norm, tokens/s, MFU/HFU, memory per
               host, probes as a fraction of the Bayes-filter ceiling, the light profiler's records
sweep.py       a sweep's colours by grid point, its table of final losses, its scaling fit's figures
downsample.py  min/max-preserving buckets that keep long curves interactive
synthetic.py   fake run and sweep directories for tests, the benchmark and the notebook

An analysis-layer package: it reads run directories and is never imported by training. plotly is an
optional dependency (pip install 'nanollama[report]'); PNG export also needs kaleido and Chromium.
"""

from nanollama.report.figures import figures
from nanollama.report.read import ReportError

__all__ = ["ReportError", "figures"]
