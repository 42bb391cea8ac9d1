"""Plotly versions of the analysis figures, one self-contained HTML page of them, and PNG export with kaleido.

plotly is optional (`pip install nanollama[report]`): importing this module needs nothing, the
functions that draw say in one line what to install. PNG export needs kaleido >= 1 and a Chrome or
Chromium it can start (it finds the system `chromium` on PATH, or BROWSER_PATH); without them it is
skipped with a one-line reason, never an error, since the HTML already holds every figure.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from nanollama.analysis.plots import COLOURS, scaling_specs
from nanollama.utils.fileio import write_atomic

INSTALL = "plotly is not installed: pip install 'nanollama[report]' (or pip install plotly)"


def plotly():
    """The plotly.graph_objects module; ImportError with what to install when plotly is missing."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise ImportError(INSTALL) from None
    return go


def from_spec(title: str, xlabel: str, ylabel: str, series: list[dict], logy: bool = True):
    """A plotly Figure of one plots.figure spec (the same series the SVG draws; x is always log)."""
    go = plotly()
    fig = go.Figure()
    for i, s in enumerate(series):
        colour = s.get("colour", COLOURS[i % len(COLOURS)])
        label = s.get("label") or ""
        if s["kind"] == "hline":
            fig.add_hline(y=float(s["y"]), line_dash="dash", line_color=colour)
            if label:  # add_hline draws a shape, which has no legend entry: a legend-only trace names it
                fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label, line={"color": colour}))
            continue
        mode = "lines" if s["kind"] == "line" else "markers"
        fig.add_trace(
            go.Scatter(
                x=np.asarray(s["x"], float),
                y=np.asarray(s["y"], float),
                mode=mode,
                name=label,
                showlegend=bool(label),
                marker={"color": colour, "opacity": 0.7},
                line={"color": colour},
            )
        )
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, template="plotly_white")
    fig.update_xaxes(type="log")
    if logy:
        fig.update_yaxes(type="log")
    return fig


def scaling_plotly(fit, n, d, loss, bayes) -> dict:
    """name -> plotly Figure: the figures of plots.scaling_figures, interactive."""
    return {name: from_spec(*spec) for name, spec in scaling_specs(fit, n, d, loss, bayes).items()}


def _div(fig, name: str) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}", config={"responsive": True})


def page(figures: dict, title: str, notes: list[str] = ()) -> str:
    """One HTML page with plotly.js embedded once (it opens offline) and every figure in its own div.

    Names with a "/" (section/figure) are grouped under a heading per section.
    """
    plotly()
    from plotly.offline import get_plotlyjs

    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em 2em}h2{margin-top:1.5em}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    out += [f"<p>{html.escape(n)}</p>" for n in notes]
    section = None
    for i, (name, fig) in enumerate(figures.items()):
        head = name.rsplit("/", 1)[0] if "/" in name else None
        if head != section and head is not None:
            out.append(f"<h2>{html.escape(head)}</h2>")
        section = head
        out.append(_div(fig, str(i)))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_html(figures: dict, path: str | Path, title: str, notes: list[str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, page(figures, title, notes))
    path.chmod(0o644)  # a page to share: the temporary file it was renamed from was private
    return path


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_png(figures: dict, out_dir: str | Path, width: int = 900, height: int = 500) -> str:
    """PNG files of the figures under out_dir (one kaleido browser for all); returns a one-line outcome."""
    try:
        import kaleido  # noqa: F401  (plotly's image export needs it; checked here to say so)
        import plotly.io as pio
    except ImportError:
        return "PNG skipped: kaleido is not installed (pip install kaleido; it also needs Chrome or Chromium)"
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{_file_name(name)}.png" for name in figures]
    tmp = [p.with_name(f".{p.name}.tmp.png") for p in paths]  # renamed once written: no half PNG left behind
    try:
        pio.write_images(list(figures.values()), tmp, format="png", width=width, height=height)
    except Exception as e:  # kaleido's own errors (no browser, browser crashed) vary by version
        for t in tmp:
            t.unlink(missing_ok=True)
        if created and not any(out_dir.iterdir()):  # leave nothing behind, not even the empty directory
            out_dir.rmdir()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"PNG skipped: kaleido could not render ({first}); it needs Chrome or Chromium (apt install chromium)"
    for t, p in zip(tmp, paths):
        t.replace(p)
    return f"wrote {len(paths)} PNG figures to {out_dir}"
