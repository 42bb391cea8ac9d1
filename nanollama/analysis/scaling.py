"""Scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta, with the irreducible loss E known or not.

    fit = fit(points, irreducible=bayes, form="ND")    # points: rows (N, D, loss); bayes: float or per point
    fit.params, fit.intervals, fit.compute_optimal(1e21)

E known (GSSM data: the Bayes-optimal loss of the same scored positions): the excess y = L - E is
fitted as A / N^alpha + B / D^beta with a Huber loss on log y. Variable projection: for fixed
exponents the coefficients are a non-negative least squares solve (Gauss-Newton on log y, a few
reweighted 2-variable NNLS), so a grid over (alpha, beta) only searches two numbers; Levenberg-Marquardt
on all parameters then polishes (batched over bootstrap resamples, which is what keeps 1000 resamples
cheap). E unknown (text data): the Epoch AI protocol (Besiroglu et al. 2024) for the 5-parameter fit,
Huber delta 1e-3 on log L = LSE(a - alpha log N, b - beta log D, e), L-BFGS from the best points of a
grid of starts. Both bootstrap by resampling clusters of points (runs sharing a label, e.g. the seeds of
one configuration) and report percentile intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Form = Literal["N", "D", "ND"]
_GRID = np.round(np.arange(0.05, 2.0001, 0.05), 4)  # exponents searched by the known-E fit (then polished)


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclass
class ScalingFit:
    """A fitted law. params: E, A, alpha (forms N, ND), B, beta (forms D, ND); intervals: (lo, hi) at `level`."""

    form: str
    known_e: bool
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    level: float
    residuals: np.ndarray  # log-space residuals per point (log prediction - log observation), nan where dropped
    used: np.ndarray  # bool per point: kept in the fit (known E: a non-positive excess cannot be logged)
    boot: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the bootstrap refits, per parameter
    delta: float = 1e-3
    n_clusters: int = 0

    def excess(self, n, d) -> np.ndarray:
        """A / N^alpha + B / D^beta at these points (the terms the form has)."""
        p = self.params
        out = np.zeros(np.broadcast(np.asarray(n, float), np.asarray(d, float)).shape)
        if "alpha" in p:
            out = out + p["A"] * np.asarray(n, float) ** -p["alpha"]
        if "beta" in p:
            out = out + p["B"] * np.asarray(d, float) ** -p["beta"]
        return out

    def predict(self, n, d, irreducible=None) -> np.ndarray:
        e = self.params.get("E") if irreducible is None else irreducible
        if e is None:
            raise ValueError("a known-E fit predicts the loss given the irreducible loss: pass irreducible=")
        return e + self.excess(n, d)

    def compute_optimal(self, compute) -> dict:
        """N*(C), D*(C) minimising the law under C = 6 N D, with bootstrap intervals (form ND only).

        N* = G (C/6)^(beta / (alpha + beta)), D* = (C/6) / N*, G = (alpha A / (beta B))^(1 / (alpha + beta)).
        """
        if self.form != "ND":
            raise ValueError("compute-optimal allocation needs form ND (both N and D terms)")
        c = np.atleast_1d(np.asarray(compute, float))

        def alloc(a, alpha, b, beta):  # parameters (R,) -> allocations (R, len(c))
            a, alpha, b, beta = (np.atleast_1d(np.asarray(x, float))[:, None] for x in (a, alpha, b, beta))
            g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
            n = g * (c / 6) ** (beta / (alpha + beta))
            return n, (c / 6) / n

        p = self.params
        n, d = (x[0] for x in alloc(p["A"], p["alpha"], p["B"], p["beta"]))
        out = {"C": c.tolist(), "N": n.tolist(), "D": d.tolist()}
        if self.boot and len(self.boot["A"]):
            bn, bd = alloc(self.boot["A"], self.boot["alpha"], self.boot["B"], self.boot["beta"])
            q = [(1 - self.level) / 2, (1 + self.level) / 2]
            out["N_interval"] = np.nanquantile(bn, q, axis=0).T.tolist()
            out["D_interval"] = np.nanquantile(bd, q, axis=0).T.tolist()
        return out

    def summary(self) -> str:
        p, iv = self.params, self.intervals
        terms = []
        if "alpha" in p:
            terms.append(f"{p['A']:.4g} / N^{p['alpha']:.4f}")
        if "beta" in p:
            terms.append(f"{p['B']:.4g} / D^{p['beta']:.4f}")
        head = ("E" if self.known_e else f"{p['E']:.4f}") + " + " + " + ".join(terms)
        lines = [f"L = {head}   ({'E known' if self.known_e else 'E fitted'}, {int(self.used.sum())} points)"]
        for k, v in p.items():
            if k in iv:
                lines.append(f"  {k:>5} = {v:.5g}   {self.level:.0%} interval [{iv[k][0]:.5g}, {iv[k][1]:.5g}]")
        rms = float(np.sqrt(np.nanmean(self.residuals**2))) if self.used.any() else float("nan")
        lines.append(f"  rms log residual {rms:.4f}, bootstrap over {self.n_clusters} clusters")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "form": self.form,
            "known_e": self.known_e,
            "params": self.params,
            "intervals": {k: list(v) for k, v in self.intervals.items()},
            "level": self.level,
            "delta": self.delta,
            "n_points": int(self.used.sum()),
            "n_clusters": self.n_clusters,
            "residuals": [None if not math.isfinite(r) else float(r) for r in self.residuals],
        }


# ----------------------------------------------------------------------------- known E: varpro + LM


def _nnls2(u, v, t, w):
    """argmin_{a, b >= 0} sum w (a u + b v - t)^2 over the last axis, batched over the leading ones."""
    suu, svv, suv = (w * u * u).sum(-1), (w * v * v).sum(-1), (w * u * v).sum(-1)
    sut, svt = (w * u * t).sum(-1), (w * v * t).sum(-1)
    det = suu * svv - suv * suv
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (svv * sut - suv * svt) / det
        b = (suu * svt - suv * sut) / det
        a1 = np.maximum(sut / suu, 0)  # b = 0
        b1 = np.maximum(svt / svv, 0)  # a = 0
    inside = (a >= 0) & (b >= 0) & np.isfinite(a) & np.isfinite(b)

    def sse(x, y):
        return (w * (x[..., None] * u + y[..., None] * v - t) ** 2).sum(-1)

    use_a = sse(a1, np.zeros_like(a1)) <= sse(np.zeros_like(b1), b1)
    a_out = np.where(inside, a, np.where(use_a, a1, 0.0))
    b_out = np.where(inside, b, np.where(use_a, 0.0, b1))
    return a_out, b_out


def _project(u, v, y, w, delta, iters=3):
    """Coefficients for fixed exponents: Gauss-Newton on log y, each step a reweighted NNLS; objective too."""
    p = np.broadcast_to(y, u.shape)
    for _ in range(iters):
        r = np.log(p) - np.log(y)
        h = np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))  # Huber's IRLS weights
        a, b = _nnls2(u, v, p * (1 - r), w * h / p**2)  # linearised log: r + (p_new - p) / p
        p = np.maximum(a[..., None] * u + b[..., None] * v, 1e-300)
    return a, b, (w * huber(np.log(p) - np.log(y), delta)).sum(-1)


def _lm(theta, cols, x, y, w, delta, iters=60):
    """Levenberg-Marquardt with Huber IRLS, batched: theta (R, P) over rows of weights w (R, n).

    Parameters per term: (log coefficient, exponent); the excess is sum_k exp(theta[2k] - theta[2k+1] x_k).
    """
    theta = theta.copy()
    lam = np.full(theta.shape[0], 1e-3)

    def evaluate(th):
        terms = [np.exp(th[:, 2 * k, None] - th[:, 2 * k + 1, None] * x[k]) for k in range(cols)]
        p = np.maximum(sum(terms), 1e-300)
        r = np.log(p) - np.log(y)
        return terms, p, r, (w * huber(r, delta)).sum(-1)

    terms, p, r, obj = evaluate(theta)
    for _ in range(iters):
        jac = np.stack([f for k in range(cols) for f in (terms[k] / p, -x[k] * terms[k] / p)], -1)  # (R, n, P)
        h = w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        jtj = np.einsum("rnp,rn,rnq->rpq", jac, h, jac)
        g = np.einsum("rnp,rn,rn->rp", jac, h, r)
        diag = np.einsum("rpp->rp", jtj)
        damped = jtj + (lam[:, None] * diag + 1e-12 * diag.max(-1, keepdims=True) + 1e-300)[:, :, None] * np.eye(
            theta.shape[1]
        )
        step = (np.linalg.pinv(damped) @ -g[..., None])[..., 0]  # pinv: a resample may leave a term unidentified
        step = np.where(np.isfinite(step), step, 0.0)
        new = theta + step
        t2, p2, r2, obj2 = evaluate(new)
        better = obj2 < obj
        theta = np.where(better[:, None], new, theta)
        terms = [np.where(better[:, None], a, b) for a, b in zip(t2, terms)]
        p, r = (np.where(better[:, None], a, b) for a, b in ((p2, p), (r2, r)))
        obj = np.where(better, obj2, obj)
        lam = np.clip(np.where(better, lam / 3, lam * 4), 1e-9, 1e9)
    return theta, obj


def _known_e(logn, logd, y, form, delta, weights):
    """Known-E fit on log excess; weights (R, n): row 0 the plain fit, the others bootstrap resamples."""
    xs = {"N": [logn], "D": [logd], "ND": [logn, logd]}[form]
    centres = [float(np.mean(x)) for x in xs]
    x = [xi - c for xi, c in zip(xs, centres)]  # centred logs: the coefficient and exponent decouple
    w0 = weights[:1]
    if form == "ND":
        ga, gb = np.meshgrid(_GRID, _GRID, indexing="ij")
        ga, gb = ga.ravel(), gb.ravel()
        u, v = np.exp(-ga[:, None] * x[0]), np.exp(-gb[:, None] * x[1])
        a, b, obj = _project(u, v, y, w0, delta)
        i = int(np.argmin(obj))
        theta0 = np.array([math.log(max(a[i], 1e-30)), ga[i], math.log(max(b[i], 1e-30)), gb[i]])
    else:
        u = np.exp(-_GRID[:, None] * x[0])
        a, _, obj = _project(u, np.zeros_like(u), y, w0, delta)
        i = int(np.argmin(obj))
        theta0 = np.array([math.log(max(a[i], 1e-30)), _GRID[i]])
    best, _ = _lm(theta0[None], len(x), x, y, w0, delta)
    rows, _ = _lm(np.repeat(best, len(weights), 0), len(x), x, y, weights, delta)
    rows[0] = best[0]
    names = {"N": [("A", "alpha")], "D": [("B", "beta")], "ND": [("A", "alpha"), ("B", "beta")]}[form]
    out = {}
    for k, (cn, en) in enumerate(names):
        out[en] = rows[:, 2 * k + 1]
        out[cn] = np.exp(rows[:, 2 * k] + rows[:, 2 * k + 1] * centres[k])  # undo the centring
    return out


# ----------------------------------------------------------------------------- unknown E: Epoch protocol


def _epoch_objective(theta, logn, logd, logl, w, delta, form):
    """Huber of LSE(a - alpha log N, b - beta log D, e) - log L; theta (..., 5) = (e, a, alpha, b, beta)."""
    parts = [theta[..., 0:1]]
    if form in ("N", "ND"):
        parts.append(theta[..., 1:2] - theta[..., 2:3] * logn)
    if form in ("D", "ND"):
        parts.append(theta[..., 3:4] - theta[..., 4:5] * logd)
    big = torch.broadcast_tensors(*parts)
    r = torch.logsumexp(torch.stack(big), 0) - logl
    return (w * torch.nn.functional.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta)).sum(-1)


def _lbfgs(theta0, args, iters=500, tol=1e-12):
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=iters, tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = _epoch_objective(theta, *args)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return theta.detach().numpy().copy(), float(_epoch_objective(theta, *args))


def _unknown_e(logn, logd, loss, form, delta, weights, starts):
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    ln, ld, ll = t(logn), t(logd), t(np.log(loss))
    # Epoch's grid of starts (e, a, b in steps of 0.5 / 5, exponents 0..2 in steps of 0.5), scored at once.
    es, cs, xs = np.arange(-1, 1.51, 0.5), np.arange(0, 30.1, 5), np.arange(0, 2.01, 0.5)
    if form == "ND":
        grid = np.stack(np.meshgrid(es, cs, xs, cs, xs, indexing="ij"), -1).reshape(-1, 5)
    elif form == "N":
        grid = np.stack(np.meshgrid(es, cs, xs, [0.0], [0.0], indexing="ij"), -1).reshape(-1, 5)
    else:
        grid = np.stack(np.meshgrid(es, [0.0], [0.0], cs, xs, indexing="ij"), -1).reshape(-1, 5)
    w0 = t(weights[0])
    with torch.no_grad():
        scores = _epoch_objective(t(grid), ln, ld, ll, w0, delta, form)
    scores = scores.reshape(-1).numpy()
    best, best_obj = None, math.inf
    for i in np.argsort(scores)[:starts]:
        theta, obj = _lbfgs(grid[i], (ln, ld, ll, w0, delta, form))
        if np.all(np.isfinite(theta)) and obj < best_obj:
            best, best_obj = theta, obj
    rows = [best]
    for wb in weights[1:]:
        rows.append(_lbfgs(best, (ln, ld, ll, t(wb), delta, form), iters=100, tol=1e-8)[0])  # from the optimum
    rows = np.array(rows)
    out = {"E": np.exp(rows[:, 0])}
    if form in ("N", "ND"):
        out["A"], out["alpha"] = np.exp(rows[:, 1]), rows[:, 2]
    if form in ("D", "ND"):
        out["B"], out["beta"] = np.exp(rows[:, 3]), rows[:, 4]
    return out


# ----------------------------------------------------------------------------- the entry point


def _as_points(points) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2 or arr.shape[1] not in (3, 4):
        raise ValueError(f"points must be rows (N, D, loss[, bayes]), got shape {arr.shape}")
    return arr


def bootstrap_weights(clusters, n_boot: int, seed: int) -> np.ndarray:
    """(1 + n_boot, n) weights: row 0 all ones, then cluster resamples (a point weighs its cluster's count)."""
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    counts = np.random.default_rng(seed).multinomial(len(labels), np.full(len(labels), 1 / len(labels)), n_boot)
    return np.concatenate([np.ones((1, len(inverse))), counts[:, inverse].astype(float)])


def fit(
    points,
    irreducible: None | float | np.ndarray = None,
    form: Form = "ND",
    *,
    clusters=None,
    n_boot: int = 200,
    level: float = 0.9,
    delta: float | None = None,
    seed: int = 0,
    starts: int = 4,
) -> ScalingFit:
    """Fit L = E + A / N^alpha + B / D^beta (the terms of `form`) to rows (N, D, loss[, bayes]).

    irreducible: None fits E (the 5-parameter Epoch protocol); a float or one value per point is the
    known E (a 4th column of `points` is not used unless passed: irreducible=points[:, 3]).
    clusters: one label per point, resampled together by the bootstrap (default: each point its own).
    delta: the Huber threshold on log residuals (default 1e-3 with E fitted, as Epoch;
    1e-2 with E known, where residuals are relative errors of the excess, a few percent).
    """
    if form not in ("N", "D", "ND"):
        raise ValueError(f"form must be N, D or ND, got {form!r}")
    arr = _as_points(points)
    n, d, loss = arr[:, 0], arr[:, 1], arr[:, 2]
    clusters = np.arange(len(arr)) if clusters is None else np.asarray(clusters)
    if len(clusters) != len(arr):
        raise ValueError(f"clusters: {len(clusters)} labels for {len(arr)} points")
    known = irreducible is not None
    delta = (1e-2 if known else 1e-3) if delta is None else delta
    if known:
        e = np.broadcast_to(np.asarray(irreducible, float), loss.shape)
        used = np.isfinite(loss) & (loss - e > 0) & (n > 0) & (d > 0)
    else:
        used = np.isfinite(loss) & (loss > 0) & (n > 0) & (d > 0)
    if used.sum() < (3 if form != "ND" else 5):
        raise ValueError(f"too few usable points for form {form}: {int(used.sum())}")
    weights = bootstrap_weights(clusters[used], n_boot, seed)
    logn, logd = np.log(n[used]), np.log(d[used])
    if known:
        rows = _known_e(logn, logd, loss[used] - e[used], form, delta, weights)
    else:
        rows = _unknown_e(logn, logd, loss[used], form, delta, weights, starts)
    params = {k: float(v[0]) for k, v in rows.items()}
    boot = {k: v[1:] for k, v in rows.items()}
    q = [(1 - level) / 2, (1 + level) / 2]
    intervals = {k: tuple(float(x) for x in np.quantile(v, q)) for k, v in boot.items()} if n_boot else {}
    out = ScalingFit(form, known, params, intervals, level, np.full(len(arr), np.nan), used, boot, delta)
    out.n_clusters = len(np.unique(clusters[used]))
    if known:
        out.residuals[used] = np.log(out.excess(n[used], d[used])) - np.log(loss[used] - e[used])
    else:
        out.residuals[used] = np.log(out.predict(n[used], d[used])) - np.log(loss[used])
    return out
