"""Gathering launcher sweeps into scaling points (nanollama.analysis.gather) and the scaling command."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nanollama import config, models
from nanollama.analysis.gather import gather
from nanollama.scaling.__main__ import main
from nanollama.train.cli import parse

DEBUG = Path(__file__).parents[1] / "configs" / "gssm" / "debug.yaml"
STEPS, BATCH, SEQ = 10, 4, 16


def n_params(cfg):
    with torch.device("meta"):
        return models.get(cfg.model.arch).num_params(models.build(cfg.model), False)


def write_task(log_dir, task, dim, seed, exit_code=0, losses=None, final_eval=True, world=1, run_dir=None, extra=()):
    """One task of a fake launch: its index line, stdout, config.yaml and metrics.jsonl."""
    run_dir = Path(run_dir or log_dir / "runs" / str(task))
    cfg = parse([str(DEBUG), f"model.dim={dim}", "model.n_layers=1", f"data.batch_size={BATCH}", f"data.seq_len={SEQ}",
                 f"steps={STEPS}", f"seed={seed}", f"run_dir={run_dir}", *extra])  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config.dump(cfg))
    bayes = 1.5
    loss = bayes + 3.0 * n_params(cfg) ** -0.3 * (1 + 0.001 * seed)
    records = [
        {"step": s, "loss": (losses or {}).get(s, 2.0), "tokens_per_s": 100.0 * world, "tokens_per_s_per_device": 100.0}
        for s in range(1, STEPS + 1)
    ]
    if final_eval:
        records.append({"step": STEPS, "eval_loss": loss, "bayes_loss": bayes, "excess_loss": loss - bayes})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(log_dir / "tasks.jsonl", "a") as f:
        grid = {"model.dim": dim, "seed": seed, **dict(e.split("=") for e in extra)}
        f.write(json.dumps({"id": task, "grid": grid, "run_dir": str(run_dir)}) + "\n")
    (log_dir / "stdout").mkdir(exist_ok=True)
    lines = [f"[launcher] task {task}: attempt at host"]
    if exit_code is not None:
        lines.append(f"[launcher] task {task}: exit code {exit_code}")
    (log_dir / "stdout" / f"{task}.out").write_text("\n".join(lines) + "\n")
    return cfg, loss


@pytest.fixture
def sweep(tmp_path):
    log = tmp_path / "sweep"
    log.mkdir()
    (log / "SUBMITTED").write_text("")
    good = {}
    task = 0
    for dim in (16, 32, 64):
        for seed in (0, 1):
            good[task] = write_task(log, task, dim, seed, world=2 if task == 5 else 1)
            task += 1
    write_task(log, 6, 16, 2, exit_code=None)  # still running
    write_task(log, 7, 16, 3, exit_code=3)  # diverged: the launcher saw exit 3
    write_task(log, 8, 16, 4, losses={4: math.nan})  # a nonfinite loss in the metrics
    write_task(log, 9, 16, 5, final_eval=False)  # no evaluation at the last step
    write_task(log, 10, 16, 6, exit_code=75)  # preempted
    with open(log / "tasks.jsonl", "a") as f:  # the same run directory listed twice
        f.write(json.dumps({"id": 0, "grid": {}, "run_dir": str(log / "runs" / "0")}) + "\n")
    other = tmp_path / "rerun"  # a second launch of task 1's config into another directory
    other.mkdir()
    write_task(other, 0, 16, 1, run_dir=log / "runs" / "1")
    return log, other, good


def test_gather_keeps_finished_runs_and_says_why_the_others_are_left_out(sweep):
    log, other, good = sweep
    got = gather([log, other])
    assert [r.task for r in got.runs] == list(range(6))
    for r in got.runs:
        cfg, loss = good[r.task]
        assert r.n == n_params(cfg) and r.params > r.n and r.loss == pytest.approx(loss) and r.bayes == 1.5
        assert r.d == r.tokens_seen == STEPS * BATCH * SEQ * (2 if r.task == 5 else 1) and r.unique_tokens is None
    assert len({r.n for r in got.runs}) == 3 and len({r.cluster for r in got.runs}) == 3  # seeds share a cluster
    why = dict((Path(d).name, w) for d, w in got.left_out)
    assert why["6"] == "unfinished (running)" and why["10"] == "unfinished (preempted)"
    assert why["7"] == "diverged (exit 3)" and why["8"] == "diverged (nonfinite loss)"
    assert why["9"].startswith("missing an evaluation")
    dups = [w for d, w in got.left_out if w.startswith("duplicate")]
    assert len(dups) == 2 and len(got.left_out) == 7  # task 0 listed again; task 1's config launched twice


def test_tokens_unique_counts_the_data_budget(tmp_path, sweep):
    log, _, _ = sweep
    cfg = config.load(type(parse([str(DEBUG)])), log / "runs" / "0" / "config.yaml")
    cfg.data.train_sequences = 40
    (log / "runs" / "0" / "config.yaml").write_text(config.dump(cfg))
    runs = {r.task: r for r in gather([log]).runs}
    assert runs[0].d == runs[0].unique_tokens == 40 * SEQ and runs[1].d == runs[1].tokens_seen
    assert gather([log], "seen").runs[0].d == STEPS * BATCH * SEQ
    assert {r.task for r in gather([log], "unique").runs} == {0}


def test_the_command_fits_prints_and_writes(sweep, tmp_path, capsys):
    log, other, _ = sweep
    out = tmp_path / "fit"
    assert main([str(log), str(other), "--form", "N", "--out", str(out), "--boot", "50", "--no-png"]) == 0
    text = capsys.readouterr().out
    assert "left out:" in text and "diverged (exit 3)" in text and "E known" in text
    result = json.loads((out / "fit.json").read_text())
    assert result["fit"]["params"]["alpha"] == pytest.approx(0.3, abs=2e-3) and result["fit"]["known_e"]
    assert len(result["runs"]) == 6 and len(result["left_out"]) == 7
    lo, hi = result["fit"]["intervals"]["alpha"]
    assert lo <= result["fit"]["params"]["alpha"] <= hi
    svgs = sorted(p.name for p in out.glob("*.svg"))
    assert svgs == ["excess_vs_N.svg", "loss_vs_N.svg", "residuals_vs_N.svg"]
    assert (out / "loss_vs_N.svg").read_text().startswith("<svg") and np.isfinite(result["fit"]["residuals"]).all()


def test_the_command_refuses_what_it_cannot_fit(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no tasks.jsonl" in capsys.readouterr().err


def test_figures_are_well_formed_svg_for_every_form():
    from xml.etree import ElementTree

    from nanollama.analysis.plots import scaling_figures
    from nanollama.analysis.scaling import fit

    rng = np.random.default_rng(0)
    n = np.repeat(10 ** np.linspace(6, 7.5, 4), 3)
    d = np.tile(10 ** np.linspace(7, 10, 3), 4)
    bayes = np.full(len(n), 1.2)
    loss = bayes + (300 * n**-0.4 + 800 * d**-0.3) * np.exp(0.01 * rng.standard_normal(len(n)))
    law = fit(np.stack([n, d, loss], 1), irreducible=bayes, form="ND", n_boot=0)
    figs = scaling_figures(law, n, d, loss, bayes)
    assert set(figs) == {f"{k}_vs_{v}" for k in ("loss", "excess", "residuals") for v in "ND"}
    for svg in figs.values():
        root = ElementTree.fromstring(svg)
        assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}circle")) >= len(n)
    assert figs["loss_vs_N"].count("<polyline") == 3  # one fitted curve per D


def test_alpha_arms_average_seeds_and_add_the_gzip_reference(tmp_path, capsys):
    from nanollama.analysis.alphas import arm
    from nanollama.scaling.alphas import main as alphas_main

    log = tmp_path / "arm"
    log.mkdir()
    task = 0
    for alpha in ("0.01", "1.0"):
        for seed in (0, 1):
            write_task(log, task, 16, seed, extra=[f"data.gssm.nodes.2.alpha={alpha}"])
            task += 1
    a = arm(log)
    assert a["key"] == "data.gssm.nodes.2.alpha" and [r["alpha"] for r in a["rows"]] == [0.01, 1.0]
    for r in a["rows"]:
        assert r["seeds"] == 2 and r["excess_std"] > 0 and r["gzip_nats"] > r["gzip_excess"] > 0
    assert a["rows"][0]["gzip_nats"] < a["rows"][1]["gzip_nats"]  # near-deterministic tokens compress better
    assert alphas_main([f"X={log}", "--out", str(tmp_path / "out")]) == 0
    assert "gzip excess" in capsys.readouterr().out and (tmp_path / "out" / "excess_vs_alpha.svg").exists()
    assert alphas_main([str(log)]) == 2
