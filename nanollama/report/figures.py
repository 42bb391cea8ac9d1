"""The report's plotly figures, per section (a sweep, or the run directories given on their own).

Each figure is left out when no run has its data (text runs have no Bayes floor nor excess loss; a
run without probes.jsonl or profile.jsonl has no probe or profile figures). Long curves are thinned
by nanollama.report.downsample, with a per-trace budget that shrinks as traces multiply, so that a
figure holds at most about POINTS_PER_FIGURE points (and each trace 200 to 1000).
"""

from __future__ import annotations

import numpy as np

from nanollama.analysis.interactive import plotly
from nanollama.report import sweep
from nanollama.report.downsample import MAX_POINTS, downsample
from nanollama.report.read import Run, Section, read

POINTS_PER_FIGURE = 60_000
GIB = 2**30


class Builder:
    """Figures of one section, with its runs' colours and the downsampling budget."""

    def __init__(self, section: Section, max_points: int | None = None):
        self.go = plotly()
        self.section = section
        self.runs = section.runs
        self.colour = sweep.colours(self.runs)
        self.tokens = all(r.tokens_per_step for r in self.runs)  # else curves against steps
        if max_points is None:  # ~3 traces per run in the busiest figures
            max_points = int(np.clip(POINTS_PER_FIGURE // (3 * max(len(self.runs), 1)), 200, MAX_POINTS))
        self.max_points = max_points
        self.groups_shown: set[tuple[str, str]] = set()

    def x(self, run: Run, steps: np.ndarray) -> np.ndarray:
        return steps * run.tokens_per_step if self.tokens else steps

    def trace(self, fig_name: str, run: Run, x, y, suffix: str = "", **kw):
        """A line of one run, coloured by its group; the legend names each group once per figure."""
        x, y = np.asarray(x), np.asarray(y, float)
        ok = np.isfinite(y)
        if not ok.any():
            return None
        x, y = downsample(x[ok], y[ok], self.max_points)
        group = sweep.group_of(run) or run.name
        first = (fig_name, group + suffix) not in self.groups_shown
        self.groups_shown.add((fig_name, group + suffix))
        return self.go.Scatter(
            x=x, y=y, name=group + suffix, legendgroup=group, showlegend=first, mode=kw.pop("mode", "lines"),
            line={"color": self.colour[group], **kw.pop("line", {})}, hovertext=run.name + suffix, **kw,
        )  # fmt: skip

    def figure(self, traces, title: str, ytitle: str, xtitle: str | None = None, logx=False, logy=False):
        traces = [t for t in traces if t is not None]
        if not traces:
            return None
        fig = self.go.Figure(data=traces)
        fig.update_layout(title=title, xaxis_title=xtitle or ("tokens" if self.tokens else "step"),
                          yaxis_title=ytitle, template="plotly_white", hovermode="closest", height=450)  # fmt: skip
        if logx:
            fig.update_xaxes(type="log")
        if logy:
            fig.update_yaxes(type="log")
        return fig

    def loss(self):
        traces = []
        for r in self.runs:
            traces.append(self.trace("loss", r, self.x(r, r.train["step"]), r.train["loss"], " train", opacity=0.6))
            traces.append(self.trace("loss", r, self.x(r, r.evals["step"]), r.evals["eval_loss"], " eval",
                                     mode="lines+markers", line={"dash": "dot"}))  # fmt: skip
        floors = {}
        for r in self.runs:
            b = r.evals.get("bayes_loss", np.array([]))
            if np.isfinite(b).any():
                floors.setdefault(round(float(np.nanmean(b)), 6), r)
        fig = self.figure(traces, "loss against tokens (dashed: the Bayes-optimal loss, the floor)", "loss")
        if fig is not None:
            for value in floors:  # one line per distinct floor: a sweep over one data set has one
                fig.add_hline(
                    y=value,
                    line_dash="dash",
                    line_color="black",
                    annotation_text=f"Bayes-optimal {value:.4f}",
                    annotation_position="bottom right",
                )
        return fig

    def excess(self):
        traces = [self.trace("excess", r, self.x(r, r.evals["step"]), np.where(r.evals["excess_loss"] > 0,
                  r.evals["excess_loss"], np.nan), mode="lines+markers") for r in self.runs if r.has_bayes]  # fmt: skip
        return self.figure(traces, "excess loss (eval loss - Bayes-optimal), log-log", "excess loss", logx=True,
                           logy=True)  # fmt: skip

    def per_step(self, key: str, title: str, ytitle: str, logy=False):
        traces = [self.trace(key, r, r.train["step"], r.train[key]) for r in self.runs]
        return self.figure(traces, title, ytitle, "step", logy=logy)

    def utilisation(self):
        traces = []
        for r in self.runs:
            traces.append(self.trace("util", r, r.train["step"], r.train["mfu"], " MFU"))
            traces.append(self.trace("util", r, r.train["step"], r.train["hfu"], " HFU", line={"dash": "dot"}))
        return self.figure(traces, "model and hardware FLOPs utilisation (MFU solid, HFU dotted)", "fraction",
                           "step")  # fmt: skip

    def memory(self):
        traces = []
        dashes = {"rss_bytes": "solid", "cuda_max_allocated": "dot", "cuda_max_reserved": "dash"}
        for r in self.runs:
            hosts = np.array(r.hosts)
            for host in dict.fromkeys(r.hosts):
                sel = hosts == host
                for key, dash in dashes.items():
                    y = r.train[key][sel] / GIB
                    traces.append(
                        self.trace("memory", r, r.train["step"][sel], y, f" {host} {key}", line={"dash": dash})
                    )
        return self.figure(traces, "memory per host (GiB; rss solid, CUDA max allocated dotted, reserved dashed)",
                           "GiB", "step")  # fmt: skip

    def probes(self):
        traces, layers = [], {}
        for r in self.runs:
            for rec in r.probes:
                if isinstance(rec.get("acc_frac"), (int, float)) and "step" in rec:
                    layers.setdefault((r.name, rec.get("layer", "?"), rec.get("node", "?")), []).append(rec)
        if not layers:
            return None
        by_run = {r.name: r for r in self.runs}
        order = list(dict.fromkeys(layer for _, layer, _ in layers))  # colour by layer, dash by hidden node
        nodes = list(dict.fromkeys(node for _, _, node in layers))
        palette, dashes = sweep.PALETTE, ["solid", "dot", "dash", "longdash", "dashdot"]
        for (run_name, layer, node), recs in layers.items():
            recs.sort(key=lambda rec: rec["step"])
            colour = palette[order.index(layer) % len(palette)]
            label = f"{layer} / {node}" + (f" ({run_name})" if len(self.runs) > 1 else "")
            traces.append(self.go.Scatter(
                x=[rec["step"] for rec in recs], y=[rec["acc_frac"] for rec in recs], mode="lines+markers",
                name=label, legendgroup=layer, hovertext=by_run[run_name].name,
                line={"color": colour, "dash": dashes[nodes.index(node) % len(dashes)]},
            ))  # fmt: skip
        fig = self.figure(traces, "probe accuracy as a fraction of the Bayes filter's (1 = the ceiling), by layer",
                          "acc / ceiling_acc", "step")  # fmt: skip
        fig.add_hline(y=1.0, line_dash="dash", line_color="black")
        return fig

    def profile(self) -> dict:
        """Light-profiler figures from profile*.jsonl: the step's time split, throughput and MFU/HFU, memory."""
        out = {}
        files = [(r, stem, recs) for r in self.runs for stem, recs in r.profiles.items()]
        if not files:
            return out
        keys = list(dict.fromkeys(k for _, _, recs in files for k in recs[0]))
        times = [k for k in keys if k.endswith("_s") and not k.endswith("per_s") and k != "step"]
        mems = [k for k in keys if k.startswith("mem")]
        kinds = {"time": (times, "s", "the step's wall time split (s)"),
                 "throughput": ([k for k in ("tokens_per_s",) if k in keys], "tokens/s", "tokens/s (profiler)"),
                 "utilisation": ([k for k in ("mfu", "hfu") if k in keys], "fraction", "MFU and HFU (profiler)"),
                 "memory": (mems, "GiB", "memory (profiler, GiB)")}  # fmt: skip
        dashes = ["solid", "dot", "dash", "longdash", "dashdot"]
        for kind, (ks, unit, title) in kinds.items():
            traces = []
            for r, stem, recs in files:
                cols = {k: np.array([float(v) if isinstance(v := rec.get(k), (int, float)) else np.nan
                                     for rec in recs]) for k in ("step", *ks)}  # fmt: skip
                for i, k in enumerate(ks):
                    y = cols[k] / GIB if kind == "memory" else cols[k]
                    suffix = f" {stem} {k}" if len(files) > 1 else f" {k}"
                    # one run: a colour per field reads better than dashes alone; several: the run's colour
                    line = {"dash": dashes[i % len(dashes)]}
                    if len(files) == 1:
                        line = {"color": sweep.PALETTE[i % len(sweep.PALETTE)]}
                    traces.append(self.trace(f"profile_{kind}", r, cols["step"], y, suffix, line=line))
            fig = self.figure(traces, title, unit, "step")
            if fig is not None:
                out[f"profile_{kind}"] = fig
        return out

    def all(self, fit: bool = True) -> tuple[dict, list[str]]:
        figs, notes = {}, []
        candidates = {
            "loss": self.loss, "excess": self.excess,
            "lr": lambda: self.per_step("lr", "learning rate", "lr"),
            "grad_norm": lambda: self.per_step("grad_norm", "gradient norm (before clipping)", "grad norm", logy=True),
            "tokens_per_s": lambda: self.per_step("tokens_per_s", "throughput (all devices)", "tokens/s"),
            "mfu_hfu": self.utilisation, "memory": self.memory, "probes": self.probes,
        }  # fmt: skip
        for name, make in candidates.items():
            fig = make()
            if fig is not None:
                figs[name] = fig
        figs.update(self.profile())
        if self.section.log_dir is not None:
            figs["final_losses"] = sweep.table(self.section)
            if fit:
                scaled, note = sweep.scaling(self.section)
                figs.update(scaled)
                notes.append(f"{self.section.label}: {note}")
        return figs, notes


def build(sections: list[Section], max_points: int | None = None, fit: bool = True) -> tuple[dict, list[str]]:
    """(name -> Figure, notes) over the sections; names are section/figure when there are several."""
    figs, notes = {}, []
    for section in sections:
        got, more = Builder(section, max_points).all(fit)
        prefix = f"{section.label}/" if len(sections) > 1 else ""
        figs.update({prefix + k: v for k, v in got.items()})
        notes += more
    return figs, notes


def figures(*paths, max_points: int | None = None, fit: bool = True) -> dict:
    """name -> plotly Figure of these run directories and launcher log directories (see nanollama.report)."""
    flat = [p for item in paths for p in ([item] if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__")
                                          else item)]  # fmt: skip
    return build(read(flat), max_points, fit)[0]
