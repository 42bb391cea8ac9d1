"""Scaling-law fits (nanollama.analysis.scaling) on synthetic surfaces with known parameters and on Chinchilla."""

import csv
from pathlib import Path

import numpy as np
import pytest

from nanollama.analysis.scaling import fit

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_svg_extracted_data.csv"


def surface(rng, n_points, noise):
    """A sweep with 3 seeds per (N, D) configuration: N over 1.5 decades, D over 3, the two terms of a
    similar size (a real sweep is designed so), lognormal noise `noise` on the excess."""
    alpha, beta = rng.uniform(0.2, 0.6, 2)
    share = rng.uniform(0.3, 0.7)
    a, b = share * 0.5 * 10 ** (6.75 * alpha), (1 - share) * 0.5 * 10 ** (8.5 * beta)  # excess 0.5 at the centre
    configs = max(-(-n_points // 3), 10)
    n, d = 10 ** rng.uniform(6, 7.5, configs), 10 ** rng.uniform(7, 10, configs)
    cluster = np.repeat(np.arange(configs), 3)[:n_points]
    n, d = n[cluster], d[cluster]
    excess = a * n**-alpha + b * d**-beta
    loss = 1.5 + excess * np.exp(noise * rng.standard_normal(len(n)))
    return np.stack([n, d, loss], 1), 1.5, (alpha, beta), cluster


def surfaces(count, seed=0):
    rng = np.random.default_rng(seed)
    return [surface(rng, int(rng.integers(30, 201)), rng.uniform(0.01, 0.03)) for _ in range(count)]


def rel_errors(f, truth):
    return [abs(f.params["alpha"] / truth[0] - 1), abs(f.params["beta"] / truth[1] - 1)]


def test_known_e_recovers_exponents_and_intervals_cover():
    errors, covered = [], []
    for i, (points, e, truth, cluster) in enumerate(surfaces(20)):
        f = fit(points, irreducible=e, form="ND", clusters=cluster, n_boot=40, seed=i)
        errors += rel_errors(f, truth)
        covered += [f.intervals[k][0] <= t <= f.intervals[k][1] for k, t in zip(("alpha", "beta"), truth)]
        assert f.used.all() and np.isfinite(f.residuals).all()
    assert np.median(errors) < 0.02, np.median(errors)
    assert np.mean(covered) >= 0.7, np.mean(covered)  # nominal 0.9; 40 resamples make the ends noisy


def test_known_e_single_terms_and_per_point_floor():
    rng = np.random.default_rng(1)
    n = np.repeat(10 ** np.linspace(6, 7.5, 12), 3)
    floor = rng.uniform(1.0, 2.0, len(n))  # each run's own Bayes loss
    loss = floor + 300 * n**-0.4 * np.exp(0.01 * rng.standard_normal(len(n)))
    f = fit(np.stack([n, np.full_like(n, 1e9), loss], 1), irreducible=floor, form="N", n_boot=50)
    assert abs(f.params["alpha"] - 0.4) < 0.02 and abs(f.params["A"] / 300 - 1) < 0.5
    assert set(f.params) == {"A", "alpha"} and f.intervals["alpha"][0] < 0.4 < f.intervals["alpha"][1]
    d = n * 30
    loss = 1.2 + 50 * d**-0.3 * np.exp(0.01 * rng.standard_normal(len(d)))
    g = fit(np.stack([np.ones_like(d), d, loss], 1), irreducible=1.2, form="D", n_boot=0)
    assert abs(g.params["beta"] - 0.3) < 0.015 and g.intervals == {}


def test_known_e_drops_points_below_the_floor():
    n = 10 ** np.linspace(6, 8, 20)
    loss = 1.0 + 100 * n**-0.5
    loss[3] = 0.9  # an evaluation below the Bayes floor (noise): its log excess does not exist
    f = fit(np.stack([n, np.ones_like(n), loss], 1), irreducible=1.0, form="N", n_boot=0)
    assert not f.used[3] and f.used.sum() == 19 and np.isnan(f.residuals[3])
    assert abs(f.params["alpha"] - 0.5) < 1e-6


@pytest.mark.slow
def test_unknown_e_recovers_exponents_worse():
    """The same surfaces with E fitted: the exponents come out worse, mostly in the tail (measured on these 10
    surfaces, relative error of alpha and beta: median 1.3% known vs 2.0% fitted, mean 1.5% vs 5.6%,
    90th percentile 3.2% vs 17%)."""
    known, unknown = [], []
    for points, e, truth, _ in surfaces(10):
        known += rel_errors(fit(points, irreducible=e, n_boot=0), truth)
        unknown += rel_errors(fit(points, n_boot=0, starts=1), truth)
    known, unknown = np.array(known), np.array(unknown)
    for name, q in (("median", np.median), ("mean", np.mean), ("p90", lambda a: np.quantile(a, 0.9))):
        print(f"{name} relative exponent error: E known {q(known):.4f}, E fitted {q(unknown):.4f}")
    assert np.median(unknown) > np.median(known)
    assert np.mean(unknown) > 2 * np.mean(known) and np.quantile(unknown, 0.9) > 2 * np.quantile(known, 0.9)


def chinchilla_points():
    rows = list(csv.DictReader(CHINCHILLA.open()))
    n = np.array([float(r["Model Size"]) for r in rows])
    d = np.array([float(r["Training FLOP"]) for r in rows]) / (6 * n)
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.sort(np.argsort(loss)[:-5])  # Epoch's protocol leaves out the 5 highest losses
    return np.stack([n, d, loss], 1)[keep], len(rows)


def test_chinchilla_reproduces_epoch():
    points, rows = chinchilla_points()
    assert rows == 245
    f = fit(points, form="ND", n_boot=0, starts=2)
    p = f.params
    # Besiroglu et al. 2024: E 1.817 (SE 0.026), A 482 (124), B 2085 (1293), alpha 0.348 (0.02), beta 0.366 (0.02)
    assert abs(p["E"] - 1.817) < 0.026 and abs(p["A"] - 482) < 124 and abs(p["B"] - 2085) < 1293
    assert abs(p["alpha"] - 0.348) < 0.02 and abs(p["beta"] - 0.366) < 0.02
    opt = f.compute_optimal([1e21, 1e23])
    assert np.allclose(6 * np.array(opt["N"]) * np.array(opt["D"]), [1e21, 1e23])
    assert opt["N"][1] > opt["N"][0]


def test_compute_optimal_is_the_minimum_and_has_intervals():
    points, e, truth, cluster = surfaces(1, seed=3)[0]
    f = fit(points, irreducible=e, clusters=cluster, n_boot=40)
    c = 1e20
    opt = f.compute_optimal(c)
    n_grid = opt["N"][0] * np.exp(np.linspace(-1, 1, 201))
    losses = f.excess(n_grid, c / (6 * n_grid))
    assert abs(np.argmin(losses) - 100) <= 1
    lo, hi = opt["N_interval"][0]
    assert lo <= opt["N"][0] <= hi


def test_bad_inputs():
    with pytest.raises(ValueError, match="form"):
        fit(np.ones((10, 3)), form="X")
    with pytest.raises(ValueError, match="rows"):
        fit(np.ones((10, 2)))
    with pytest.raises(ValueError, match="too few"):
        fit(np.ones((3, 3)) * 2, irreducible=1.0)
