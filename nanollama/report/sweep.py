"""A sweep's own figures: colours by grid point, the table of final excess losses, and the scaling fit.

Seeds of one grid point share a colour and a legend group (grid keys naming a seed are left out of
the group), so a grid point is shown or hidden with one click. The fit is the scaling command's
(nanollama.analysis.gather + scaling.fit, 200 bootstrap resamples) on the finished runs, with the
form of the sweep's fit.json when the scaling command wrote one, else the terms that vary.
"""

from __future__ import annotations

import json
import math

import numpy as np

from nanollama.analysis import interactive
from nanollama.analysis.gather import gather
from nanollama.analysis.scaling import fit
from nanollama.report.read import Run, Section

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]  # fmt: skip


def group_of(run: Run) -> str:
    """The legend group: the grid point without its seed keys ("" for a run outside a sweep)."""
    return " ".join(f"{k}={v}" for k, v in run.grid.items() if "seed" not in k.lower())


def colours(runs: list[Run]) -> dict[str, str]:
    """group -> colour; more groups than the palette holds get evenly spaced Viridis colours instead."""
    groups = list(dict.fromkeys(group_of(r) or r.name for r in runs))
    if len(groups) <= len(PALETTE):
        return {g: PALETTE[i] for i, g in enumerate(groups)}
    from plotly.colors import sample_colorscale

    return dict(zip(groups, sample_colorscale("Viridis", list(np.linspace(0, 1, len(groups))))))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4f}"
    return "-" if v is None else str(v)


def table(section: Section):
    """A plotly Table: one row per task (grid values, state, step, final eval and excess loss), by grid."""
    go = interactive.plotly()
    keys = list(dict.fromkeys(k for row in section.table for k in row["grid"]))
    rows = sorted(section.table, key=lambda r: [str(r["grid"].get(k, "")) for k in keys] + [r["id"]])
    head = ["task", *keys, "state", "step", "eval_loss", "excess_loss"]
    cells = [[r["id"] for r in rows]]
    cells += [[_fmt(r["grid"].get(k)) for r in rows] for k in keys]
    cells.append([r["state"] for r in rows])
    cells.append([f"{r['step']}/{r['steps'] if r['steps'] is not None else '?'}" for r in rows])
    cells += [[_fmt(r[k]) for r in rows] for k in ("eval_loss", "excess_loss")]
    fig = go.Figure(go.Table(header={"values": head, "align": "left"}, cells={"values": cells, "align": "left"}))
    fig.update_layout(title="final losses per task (the last evaluation)", height=min(160 + 32 * len(rows), 1200))
    return fig


def _form(section: Section, n: np.ndarray, d: np.ndarray) -> str | None:
    try:
        return json.loads((section.log_dir / "fit.json").read_text())["fit"]["form"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    vary_n, vary_d = len(np.unique(n)) > 1, len(np.unique(d)) > 1
    return "ND" if vary_n and vary_d else "N" if vary_n else "D" if vary_d else None


def scaling(section: Section, n_boot: int = 200) -> tuple[dict, str]:
    """(name -> figure, a one-line note) of the sweep's scaling fit; no figures when it cannot be fitted."""
    try:
        got = gather([section.log_dir])
    except (FileNotFoundError, ValueError) as e:
        return {}, f"scaling fit skipped: {e}"
    if len(got.runs) < 3:
        return {}, f"scaling fit skipped: {len(got.runs)} finished runs with a final evaluation (3 needed)"
    points = np.array(got.points(), float)
    form = _form(section, points[:, 0], points[:, 1])
    if form is None:
        return {}, "scaling fit skipped: neither N nor D varies across the finished runs"
    bayes = [r.bayes for r in got.runs]
    floor = np.array(bayes, float) if all(b is not None for b in bayes) else None
    clusters = np.unique([r.cluster for r in got.runs], return_inverse=True)[1]
    try:
        law = fit(points, floor, form, clusters=clusters, n_boot=n_boot)
    except ValueError as e:
        return {}, f"scaling fit skipped: {e}"
    figs = interactive.scaling_plotly(law, points[:, 0], points[:, 1], points[:, 2], floor)
    left = f", {len(got.left_out)} runs left out" if got.left_out else ""
    note = f"scaling fit on {len(got.runs)} finished runs{left}: " + law.summary().splitlines()[0]
    return {f"scaling_{k}": v for k, v in figs.items()}, note
