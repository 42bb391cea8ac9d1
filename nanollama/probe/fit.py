"""Linear probes, fitted in float32 on the device the activations are on, L2 chosen on a validation split.

- `fit_softmax`: multinomial logistic regression, L2 on the weights (not the bias), mean cross-entropy
  against hard labels (the class probe) or against target distributions (the belief probe whose
  output is a distribution: the softmax of a linear map, so it lies on the simplex by construction).
- `fit_ridge`: ridge regression onto a target vector (the belief), closed form.

`Features(x_fit, x_val)` prepares one layer's activations once for every probe on it: features are
standardised with the training rows' mean and standard deviation (so one L2 grid serves every layer
whatever its scale) and expressed in the eigenbasis of their covariance. Ridge is then one
eigendecomposition for the whole grid, and L-BFGS runs on a preconditioned parametrisation (the
same objective, reparametrised) that converges in tens of steps. The caller splits by sequence:
probes see fitting and validation rows, never the rows that are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SOFTMAX_L2 = (1e-1, 1e-2, 1e-3, 1e-4)  # descending: each fit warm-starts the next
RIDGE_L2 = (1e1, 1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6)  # per row: the penalty is N * l2 * ||W||^2
MAX_ITER = 50  # L-BFGS iterations of the refit; the path's fits, warm-started, get PATH_ITER each
PATH_ITER = 20
# Stop when no gradient entry exceeds this (the mean loss's scale: 1e-4 nats per unit of a
# standardised feature) or the loss moves by less than TOL_CHANGE: probe scores do not move at the
# third decimal beyond that.
TOL_GRAD, TOL_CHANGE = 1e-4, 1e-7
# The L2 path runs on at most this many fitting rows (a prefix: whole sequences) and validates on at
# most as many; only the refit at the chosen L2 sees every training row. The path is most of the cost,
# and the chosen L2 barely moves with N beyond that.
SELECT_ROWS = 16_384


@dataclass
class Linear:
    """x -> ((x - mean) / scale) @ weight + bias; `l2` the chosen regularisation and `val_loss` its score."""

    mean: torch.Tensor  # (d,)
    scale: torch.Tensor  # (d,)
    weight: torch.Tensor  # (d, K)
    bias: torch.Tensor  # (K,)
    l2: float
    val_loss: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.scale) @ self.weight + self.bias


class _Basis:
    """The eigenbasis of the covariance of standardised features on some rows, and those rows in it."""

    def __init__(self, xs: torch.Tensor):
        self.center = xs.mean(0)  # (d,): these rows' own mean, so the eigenbasis is of a covariance
        xs = xs - self.center
        xt = xs.T.contiguous()  # (d, N): row-major operands make both matmuls of a step fast
        eigval, eigvec = torch.linalg.eigh((xt @ xs).double() / xs.shape[0])  # float64: near-singular Grams
        self.eigval, self.eigvec = eigval.clamp_min(0).float(), eigvec.float()
        self.z = xs @ self.eigvec  # (N, d)

    def project(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs - self.center) @ self.eigvec

    def to_standardised(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) acting on this basis's coordinates -> acting on standardised features."""
        w = self.eigvec @ w
        return w, b - self.center @ w

    def from_standardised(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eigvec.T @ w, b + self.center @ w


class Features:
    """One layer's training activations, split by sequence into fitting and validation rows (N, d)."""

    def __init__(self, x_fit: torch.Tensor, x_val: torch.Tensor):
        x_all = torch.cat([x_fit.float(), x_val.float()])
        self.mean = x_all.mean(0)
        self.scale = x_all.std(0).clamp_min(1e-6)  # a constant feature (a dead unit) stays finite
        xs = (x_all - self.mean) / self.scale
        self.n_fit = x_fit.shape[0]
        self.path = _Basis(xs[: min(self.n_fit, SELECT_ROWS)])  # where the L2 grid is walked
        self.z_val = self.path.project(xs[self.n_fit :][:SELECT_ROWS])
        self.full = _Basis(xs)  # where the chosen L2 is refitted

    def rows(self, y_fit: torch.Tensor, y_val: torch.Tensor):
        """(path targets, validation targets, all targets) matching the path, z_val and full rows."""
        return y_fit[: self.path.z.shape[0]], y_val[: self.z_val.shape[0]], torch.cat([y_fit, y_val])


def _lbfgs_softmax(
    basis: _Basis, target: torch.Tensor, n_classes: int, l2: float, init, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE(z W + b) + l2 ||W||^2 over the basis's rows; returns (W, b) in its coordinates.

    L-BFGS runs on v = (W / c)^T with c = (eigval / 4 + 2 l2)^(-1/2) per direction: the loss's Hessian
    is about diag(eigval / 4 + 2 l2) there (softmax curvature is at most 1/4), so v sees a
    well-conditioned problem. Loss and gradient are written out rather than autograd'ed so that
    both matmuls read row-major operands ((K, d) @ (d, N) and (K, N) @ (N, d)): 10x faster on a CPU.
    """
    z, device = basis.z, basis.z.device
    N = z.shape[0]
    c = (basis.eigval / 4 + 2 * l2).rsqrt()  # (d,)
    zc = z * c  # (N, d): the features v multiplies
    zct = zc.T.contiguous()  # (d, N)
    if target.dtype == torch.long:
        onehot_t = torch.zeros(n_classes, N, device=device)
        onehot_t[target, torch.arange(N, device=device)] = 1.0
    else:
        onehot_t = target.float().T.contiguous()  # (K, N) target distributions
    w0 = init[0] if init is not None else torch.zeros(z.shape[1], n_classes, device=device)
    b0 = init[1] if init is not None else torch.zeros(n_classes, device=device)
    v = (w0 / c[:, None]).T.contiguous().requires_grad_(True)  # (K, d)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [v, b],
        lr=1,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=TOL_GRAD,
        tolerance_change=TOL_CHANGE,
    )
    c2 = c * c

    def closure():
        with torch.no_grad():
            logits = v @ zct + b[:, None]  # (K, N)
            logp = torch.log_softmax(logits, 0)
            loss = -(onehot_t * logp).sum() / N + l2 * (v * v * c2).sum()
            g = (logp.exp() - onehot_t) / N  # (K, N): d loss / d logits (targets sum to 1)
            v.grad = g @ zc + 2 * l2 * v * c2
            b.grad = g.sum(1)
        return loss

    opt.step(closure)
    return (v.detach().T * c[:, None]), b.detach()


def _softmax_val_loss(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> float:
    logp = torch.log_softmax(z @ w + b, -1)
    if target.dtype == torch.long:
        return float(-logp.gather(1, target[:, None]).mean())
    return float(-(target * logp).sum(-1).mean())


def fit_softmax(
    feats: Features,
    y_fit: torch.Tensor,
    y_val: torch.Tensor,
    n_classes: int,
    l2_grid: Sequence[float] = SOFTMAX_L2,
    max_iter: int = MAX_ITER,
) -> Linear:
    """The L2 of `l2_grid` with the least validation cross-entropy, then refitted on fit + validation rows.

    y: (N,) int64 labels in [0, n_classes) or (N, n_classes) target distributions, fit rows then val rows.
    """
    y_path, y_sel, y_all = feats.rows(y_fit, y_val)
    best, init = None, None
    for l2 in sorted(l2_grid, reverse=True):
        w, b = _lbfgs_softmax(feats.path, y_path, n_classes, l2, init, min(max_iter, PATH_ITER))
        init = (w, b)
        val = _softmax_val_loss(feats.z_val, w, b, y_sel)
        if best is None or val < best[0]:
            best = (val, l2, w, b)
    val, l2, w, b = best
    init = feats.full.from_standardised(*feats.path.to_standardised(w, b))
    w, b = _lbfgs_softmax(feats.full, y_all, n_classes, l2, init, max_iter)
    return Linear(feats.mean, feats.scale, *feats.full.to_standardised(w, b), l2, val)


def _ridge(basis: _Basis, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge on the basis's (centred) rows: (W, b) in its coordinates."""
    y_mean = y.mean(0)
    a = (y - y_mean).T @ basis.z / basis.z.shape[0]  # (K, d): the cross-covariance, row-major operands
    return a.T / (basis.eigval + l2)[:, None], y_mean


def fit_ridge(feats: Features, y_fit: torch.Tensor, y_val: torch.Tensor, l2_grid: Sequence[float] = RIDGE_L2) -> Linear:
    """Ridge regression onto y (N, K): the L2 with the least validation squared error, refitted on all rows."""
    y_path, y_sel, y_all = (y.float() for y in feats.rows(y_fit, y_val))
    best = None
    for l2 in l2_grid:
        w, b = _ridge(feats.path, y_path, l2)
        val = float(((feats.z_val @ w + b - y_sel) ** 2).sum(-1).mean())
        if best is None or val < best[0]:
            best = (val, l2)
    val, l2 = best
    w, b = _ridge(feats.full, y_all, l2)
    return Linear(feats.mean, feats.scale, *feats.full.to_standardised(w, b), l2, val)
