"""eval_length: the loss of a trained GSSM run beyond its training length, per RoPE scaling, against the optimum."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_run import train_tiny_run

from nanollama.data import seeds
from nanollama.data.gssm import GSSM
from nanollama.evaluate import length as ev
from nanollama.kernels import rope_frequencies
from nanollama.runs import load_run

SCALINGS = ["none", "linear", "ntk", "yarn"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, object, dict]:
    run_dir = train_tiny_run(tmp_path_factory.mktemp("evlen") / "run")  # trained on data.seq_len=16
    cfg, model = load_run(run_dir, "cpu")
    return run_dir, cfg, model.state_dict()


def test_one_row_per_length_and_scaling_with_exact_bayes_and_excess(run):
    _, cfg, state = run
    # 5 training steps leave attention nearly uniform, so positions barely matter; larger weights
    # make the attention sharp and each RoPE table visible in the loss.
    state = {k: v * 4 if v.dim() >= 2 else v for k, v in state.items()}
    rows = ev.evaluate_lengths(cfg, state, [12, 40], SCALINGS, sequences=4, batch_size=3)
    assert [(r["length"], r["scaling"]) for r in rows] == [(n, s) for n in (12, 40) for s in SCALINGS]
    for length in (12, 40):
        mine = [r for r in rows if r["length"] == length]
        # the same sequences for every scaling: one optimum per length, from GSSM's exact likelihood
        gssm = GSSM(cfg.data.gssm, seed=cfg.data.graph_seed)
        seed = seeds.derive_seed(cfg.data.graph_seed, seeds.EVAL_LENGTH, length)
        tokens = gssm.sample(4, length + 1, seed=seed)
        bayes = gssm.nll(tokens, seed=seed)[:, 1:].mean().item()
        for r in mine:
            assert r["bayes"] == pytest.approx(bayes, rel=1e-6)
            assert r["excess"] == pytest.approx(r["loss"] - r["bayes"], abs=1e-6)
            assert r["loss"] > 0 and math.isfinite(r["loss"])
    short = [r for r in rows if r["length"] == 12]
    # within the trained context every scaling has factor 1, i.e. the unscaled table
    assert all(r["loss"] == pytest.approx(short[0]["loss"], abs=1e-6) for r in short)
    assert all(math.isnan(r["excess_beyond"]) for r in short)
    long = {r["scaling"]: r for r in rows if r["length"] == 40}
    assert all(math.isfinite(r["excess_beyond"]) for r in long.values())
    losses = sorted(r["loss"] for r in long.values())
    assert min(b - a for a, b in zip(losses, losses[1:])) > 1e-5  # each scaling changes the long-range loss


def test_the_unscaled_loss_is_the_models_next_token_cross_entropy(run):
    _, cfg, state = run
    (row,) = ev.evaluate_lengths(cfg, state, [20], ["none"], sequences=3, batch_size=2)
    gssm = GSSM(cfg.data.gssm, seed=cfg.data.graph_seed)
    tokens = gssm.sample(3, 21, seed=seeds.derive_seed(cfg.data.graph_seed, seeds.EVAL_LENGTH, 20))
    _, model = load_run(run[0], "cpu")
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert row["loss"] == pytest.approx(want, rel=1e-5)


def test_the_model_gets_the_scaled_rope_table(run):
    _, cfg, state = run
    trained = cfg.data.seq_len
    plain = ev.model_for(cfg.model, state, 4 * trained, None, "cpu")
    linear = ev.model_for(cfg.model, state, 4 * trained, ev.scaling_for("linear", 4 * trained, trained), "cpu")
    assert plain.rope_cos.shape[0] >= 4 * trained
    # position interpolation by 4: position 4p of the scaled table is position p of the plain one
    p = torch.arange(trained)
    torch.testing.assert_close(linear.rope_cos[4 * p], plain.rope_cos[p], rtol=0, atol=1e-5)
    torch.testing.assert_close(linear.rope_sin[4 * p], plain.rope_sin[p], rtol=0, atol=1e-5)
    yarn_dict = ev.scaling_for("yarn", 4 * trained, trained)
    assert yarn_dict == {"type": "yarn", "factor": 4.0, "original_max_seq_len": trained}
    yarn = ev.model_for(cfg.model, state, 4 * trained, yarn_dict, "cpu")
    c = cfg.model
    want_cos, _ = rope_frequencies(yarn.rope_cos.shape[0], c.head_dim, c.rope_theta, yarn_dict)
    torch.testing.assert_close(yarn.rope_cos, want_cos)
    assert ev.scaling_for("ntk", 8, trained)["factor"] == 1.0  # shorter than trained: no stretching


def test_cli_prints_one_row_per_length_and_scaling(run, capsys):
    run_dir = run[0]
    code = ev.main([str(run_dir), "--lengths", "16,32", "--scaling", "none,linear,ntk,yarn", "--sequences", "2"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = [line.split() for line in out if line.split() and line.split()[0].isdigit()]
    assert [(int(r[0]), r[1]) for r in table] == [(n, s) for n in (16, 32) for s in SCALINGS]
    for r in table:
        loss, bayes, excess = map(float, r[2:5])
        assert excess == pytest.approx(loss - bayes, abs=2e-4)
        assert (r[5] == "-") == (int(r[0]) <= 16)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--scaling", "none,bogus"], "--scaling: unknown type 'bogus'"),
        (["--lengths", "16,x"], "--lengths must be comma-separated integers"),
        (["--lengths", "0"], "--lengths must be positive"),
    ],
)
def test_cli_bad_arguments_exit_2(run, capsys, argv, match):
    assert ev.main([str(run[0]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_cli_without_a_run_exits_2(tmp_path, capsys):
    assert ev.main([str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
