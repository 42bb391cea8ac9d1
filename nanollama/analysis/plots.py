"""Standalone SVG figures of a scaling fit (no plotting library needed): log-log scatter + curves.

scaling_specs describes each figure once; figure draws it as SVG, analysis.interactive as plotly.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

W, H, M = 520, 380, 60  # figure size and margin, px
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12))) / 2
    return list(np.arange(math.floor(lo / step) * step, hi + step, step))


def figure(title: str, xlabel: str, ylabel: str, series: list[dict], logy: bool = True) -> str:
    """series: dicts with x, y (arrays), label, and kind "points" or "line" (or "hline" with y a number)."""
    xs = np.concatenate([np.asarray(s["x"], float) for s in series if s["kind"] != "hline"])
    ys = np.concatenate([np.atleast_1d(np.asarray(s["y"], float)) for s in series])
    xs, ys = xs[np.isfinite(xs) & (xs > 0)], ys[np.isfinite(ys) & ((ys > 0) | (not logy))]
    fx = np.log10
    fy = np.log10 if logy else (lambda v: np.asarray(v, float))
    x0, x1 = fx(xs.min()) - 0.05, fx(xs.max()) + 0.05
    y0, y1 = float(fy(ys.min())), float(fy(ys.max()))
    pad = 0.05 * max(y1 - y0, 1e-9)
    y0, y1 = y0 - pad, y1 + pad

    def px(x):
        return M + (fx(x) - x0) / (x1 - x0) * (W - 1.5 * M)

    def py(y):
        return H - M - (fy(y) - y0) / (y1 - y0) * (H - 1.7 * M)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
        f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">{escape(ylabel)}</text>',
        f'<rect x="{M}" y="{0.7 * M}" width="{W - 1.5 * M}" height="{H - 1.7 * M}" fill="none" stroke="#444"/>',
    ]
    for t in _ticks(10**x0, 10**x1, True):
        if x0 <= fx(t) <= x1:
            out.append(f'<text x="{px(t):.1f}" y="{H - M + 14}" text-anchor="middle">{t:.0e}</text>')
    for t in _ticks(10**y0 if logy else y0, 10**y1 if logy else y1, logy):
        if y0 <= fy(t) <= y1:
            out.append(f'<text x="{M - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    legend = 0
    for i, s in enumerate(series):
        c = s.get("colour", COLOURS[i % len(COLOURS)])
        if s["kind"] == "hline":
            y = py(float(s["y"]))
            out.append(
                f'<line x1="{M}" x2="{W - 0.5 * M}" y1="{y:.1f}" y2="{y:.1f}" stroke="{c}" stroke-dasharray="4"/>'
            )
        elif s["kind"] == "line":
            pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s["x"], s["y"]) if x > 0 and (y > 0 or not logy))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        else:
            for x, y in zip(s["x"], s["y"]):
                if x > 0 and np.isfinite(y) and (y > 0 or not logy):
                    out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}" fill-opacity="0.7"/>')
        if s.get("label"):  # one legend line per labelled series
            y = 0.7 * M + 14 + 13 * legend
            out.append(f'<text x="{W - 0.5 * M - 4}" y="{y}" text-anchor="end" fill="{c}">{escape(s["label"])}</text>')
            legend += 1
    out.append("</svg>")
    return "\n".join(out) + "\n"


def scaling_figures(fit, n, d, loss, bayes) -> dict[str, str]:
    """name -> SVG: loss against N and D with the fitted curves and the Bayes floor, excess on log-log, residuals."""
    return {name: figure(*spec) for name, spec in scaling_specs(fit, n, d, loss, bayes).items()}


def scaling_specs(fit, n, d, loss, bayes) -> dict[str, tuple]:
    """name -> (title, xlabel, ylabel, series, logy): the figures of scaling_figures, for any renderer."""
    n, d, loss = (np.asarray(a, float) for a in (n, d, loss))
    floor = None if bayes is None else np.asarray(bayes, float)
    figs = {}
    e = fit.params.get("E", None if floor is None else float(np.nanmean(floor)))
    for var, other, name in ((n, d, "N"), (d, n, "D")):
        if name not in fit.form:
            continue
        series = []
        groups = np.unique(other)
        if len(groups) > len(COLOURS):  # too many lines: a curve at the median of the other variable
            groups = np.array([float(np.median(other))])
        grid = np.exp(np.linspace(np.log(var.min()), np.log(var.max()), 60))
        for i, g in enumerate(groups):
            sel = other == g if len(groups) > 1 or g in other else np.ones(len(var), bool)
            lab = f"{'D' if name == 'N' else 'N'}={g:.2g}" if len(groups) > 1 else ""
            series.append({"x": var[sel], "y": loss[sel], "kind": "points", "label": lab, "colour": COLOURS[i]})
            curve_n, curve_d = (grid, np.full_like(grid, g)) if name == "N" else (np.full_like(grid, g), grid)
            if e is not None:
                series.append({"x": grid, "y": e + fit.excess(curve_n, curve_d), "kind": "line", "colour": COLOURS[i]})
        if e is not None:
            series.append(
                {"y": e, "kind": "hline", "label": "Bayes floor" if floor is not None else "E", "colour": "#000"}
            )
        figs[f"loss_vs_{name}"] = (f"eval loss against {name}", name, "eval loss", series, False)
        if floor is not None or "E" in fit.params:
            excess = loss - (floor if floor is not None else fit.params["E"])
            model = fit.excess(n, d)
            figs[f"excess_vs_{name}"] = (
                f"excess loss against {name} (log-log)",
                name,
                "loss - E",
                [
                    {"x": var, "y": excess, "kind": "points", "label": "runs"},
                    {"x": var, "y": model, "kind": "points", "label": "fit at each run", "colour": "#d62728"},
                ],
                True,
            )
        zero = {"y": 0.0, "kind": "hline", "colour": "#000"}
        points = {"x": var, "y": fit.residuals, "kind": "points", "label": ""}
        figs[f"residuals_vs_{name}"] = (
            f"log residuals against {name}",
            name,
            "log(fit) - log(observed)",
            [points, zero],
            False,
        )
    return figs
