"""The report (nanollama.report): figures of runs and sweeps, the HTML command, downsampling, the notebook.

The browser check and the PNG export are in test_report_browser.py (slow).
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("plotly", reason="the report needs plotly: pip install 'nanollama[report]'")

from nanollama.analysis import interactive  # noqa: E402
from nanollama.report import ReportError, figures  # noqa: E402
from nanollama.report.__main__ import main  # noqa: E402
from nanollama.report.downsample import downsample  # noqa: E402
from nanollama.report.synthetic import BAYES, write_run, write_sweep  # noqa: E402

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "runs.ipynb"


def test_downsample_keeps_each_buckets_extremes_and_both_ends():
    rng = np.random.default_rng(0)
    y = rng.normal(size=10_000)
    y[1234], y[4321], y[10] = 50.0, -50.0, np.nan
    x = np.arange(10_000) * 7
    xs, ys = downsample(x, y, 100)
    assert len(xs) <= 102 and xs[0] == 0 and xs[-1] == x[-1] and (np.diff(xs) > 0).all()
    assert 1234 * 7 in xs and 4321 * 7 in xs  # the spikes a stride would drop
    edges = np.linspace(0, len(y), 51).astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        assert np.nanmax(y[a:b]) in ys and np.nanmin(y[a:b]) in ys
    short_x, short_y = downsample(x[:50], y[:50], 100)
    assert (short_x == x[:50]).all()  # short curves are left alone


def _trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert found, [t.name for t in fig.data]
    return found[0]


def test_figures_of_one_run_with_probes_and_profile(tmp_path):
    run = write_run(tmp_path / "run", steps=300, log_every=10, eval_every=100, probes=True, profile=True)
    figs = figures(run)
    assert set(figs) == {"loss", "excess", "lr", "grad_norm", "tokens_per_s", "mfu_hfu", "memory", "probes",
                         "profile_time", "profile_throughput", "profile_utilisation", "profile_memory"}  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    loss = figs["loss"]
    t = _trace(loss, "run train")
    assert np.allclose(t.y, [r["loss"] for r in train]) and np.allclose(t.x, [r["step"] * 4 * 32 for r in train])
    assert [s.y0 for s in loss.layout.shapes] == [pytest.approx(BAYES)]  # the floor, once
    evals = [r for r in records if "eval_loss" in r]
    ex = figs["excess"].data[0]
    assert np.allclose(ex.y, [r["excess_loss"] for r in evals])
    assert figs["excess"].layout.xaxis.type == "log" and figs["excess"].layout.yaxis.type == "log"
    assert {t.name for t in figs["probes"].data} == {"embed / hidden", "layer.0.resid / hidden", "final_norm / hidden"}
    assert max(max(t.y) for t in figs["probes"].data) <= 1.0
    split = {"run step_s", "run data_s", "run fwd_bwd_s", "run optim_s", "run monitor_s"}
    assert {t.name for t in figs["profile_time"].data} == split  # the profiler's own fields and schema line
    assert len(figs["profile_time"].data[0].x) == 300  # the schema line is not a step
    mem = {t.name for t in figs["memory"].data}
    assert mem == {"run node0 rss_bytes", "run node0 cuda_max_allocated", "run node0 cuda_max_reserved"}


def test_a_text_run_in_progress_renders_what_it_has_without_bayes_traces(tmp_path):
    run = write_run(tmp_path / "text", steps=1000, upto=250, text=True)  # its last line is torn
    figs = figures(run)
    assert "excess" not in figs and not figs["loss"].layout.shapes
    assert max(_trace(figs["loss"], "text train").x) == 250 * 4 * 32
    assert "probes" not in figs and not any(k.startswith("profile") for k in figs)


def test_a_sweep_is_coloured_by_grid_point_with_a_table_of_final_losses(tmp_path):
    log = write_sweep(tmp_path / "sweep", dims=(16, 32, 64), seeds=(0, 1), steps=200, running=1)
    figs = figures(log, fit=False)  # the fit: test_report_browser.py (slow: gather builds each model)
    loss = figs["loss"]
    train = [t for t in loss.data if t.name.endswith("train")]
    assert len(train) == 6
    colour = {t.hovertext: t.line.color for t in train}
    assert colour["0: model.dim=16 seed=0 train"] == colour["1: model.dim=16 seed=1 train"]  # seeds share a colour
    assert len({colour[f"{i}: model.dim={d} seed=0 train"] for i, d in ((0, 16), (2, 32), (4, 64))}) == 3
    assert [t.showlegend for t in train] == [True, False] * 3  # one legend entry per grid point
    table = figs["final_losses"].data[0]
    head = list(table.header["values"])
    assert head == ["task", "model.dim", "seed", "state", "step", "eval_loss", "excess_loss"]
    cells = dict(zip(head, table.cells["values"]))
    assert list(cells["state"]).count("done") == 5 and list(cells["state"]).count("running") == 1
    assert "100/200" in cells["step"]  # the task still running, halfway
    final = json.loads((log / "runs" / "0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert cells["excess_loss"][0] == f"{final['excess_loss']:.4f}"
    assert not any(k.startswith("scaling") for k in figs)


def test_many_runs_get_a_smaller_per_trace_budget(tmp_path):
    run = write_run(tmp_path / "long", steps=5000, log_every=1, eval_every=1000)
    full = figures(run, max_points=10**9, fit=False)
    thin = figures(run)
    assert len(_trace(full["loss"], "long train").x) == 5000
    assert len(_trace(thin["loss"], "long train").x) <= 1002  # one run: the 1000-point default
    assert max(_trace(thin["loss"], "long train").y) == max(_trace(full["loss"], "long train").y)


def test_the_command_writes_one_self_contained_page(tmp_path, capsys):
    write_sweep(tmp_path / "sweep", dims=(16, 32), seeds=(0,), steps=100, eval_every=50)
    write_run(tmp_path / "run", steps=100, probes=True)
    out = tmp_path / "out" / "report.html"
    assert main([str(tmp_path / "sweep"), str(tmp_path / "run"), "-o", str(out), "--no-fit"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    assert "<script src=" not in page and "Plotly.newPlot" in page and len(page) > 3_000_000  # plotly.js inside
    figs = figures(tmp_path / "sweep", tmp_path / "run", fit=False)
    assert len(re.findall(r'<div id="fig-\d+" class="plotly-graph-div"', page)) == len(figs)
    assert f"sweep {tmp_path / 'sweep'}/loss" in figs and "runs/probes" in figs  # a section per sweep


def test_the_command_refuses_a_directory_without_metrics_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "report.html"
    assert main([str(tmp_path / "empty"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics" in err and str(tmp_path / "empty") in err and not out.exists()
    assert main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ReportError):
        figures(tmp_path / "empty")


def test_without_plotly_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match=r"pip install 'nanollama\[report\]'"):
        interactive.plotly()


def test_the_notebook_runs_its_cells_on_a_fake_run(tmp_path):
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and all(c["cell_type"] in ("code", "markdown") for c in nb["cells"])
    try:
        import nbformat

        nbformat.validate(nbformat.reads(NOTEBOOK.read_text(), as_version=4))
    except ImportError:  # the JSON checks above stand in
        pass
    run = write_run(tmp_path / "run", steps=200, probes=True)
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("outputs") == [] for c in nb["cells"] if c["cell_type"] == "code")
    scope: dict = {}
    for source in code:
        exec(compile(source, str(NOTEBOOK), "exec"), scope)
        if "PATHS" in scope and scope["PATHS"] != [str(run)]:
            scope["PATHS"] = [str(run)]  # the notebook's own default is runs/debug
    assert set(scope["figs"]) >= {"loss", "excess", "probes"}
    assert scope["figs"]["loss"].data[0].y[-1] == pytest.approx(
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]["loss"]
    )


def test_png_export_is_skipped_in_one_line_without_kaleido_or_its_browser(tmp_path, monkeypatch):
    go = interactive.plotly()
    figs = {"a": go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))}
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))  # kaleido's browser, not found
    said = interactive.write_png(figs, tmp_path / "png")
    assert said.startswith("PNG skipped: kaleido could not render") and "\n" not in said
    assert not (tmp_path / "png").exists()
    monkeypatch.setitem(sys.modules, "kaleido", None)
    said = interactive.write_png(figs, tmp_path / "png")
    assert said == "PNG skipped: kaleido is not installed (pip install kaleido; it also needs Chrome or Chromium)"
