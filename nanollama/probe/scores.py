"""Scores of one layer's probes on held-out sequences, beside the exact ceiling and the controls.

Per target (a hidden node, or the joint state):
- `acc`, `ce`: the class probe's accuracy and cross-entropy (nats) against the true z_t;
- `ceiling_acc`, `ceiling_ce`: the same for the exact posterior p(z_t | x_<=t) (its argmax, its
  probability of z_t): no function of x_<=t does better on average; `acc_frac` = acc / ceiling_acc;
- `belief_r2`: R^2 of the ridge probe (a plain linear map, not constrained to the simplex) against
  the exact belief, over all its components; `belief_kl`: mean KL(exact belief || softmax probe), a
  second probe, the softmax of a linear map fitted to the belief by cross-entropy, so its output is a
  distribution by construction;
- `chance_acc`: always guessing the fitting rows' most frequent state;
- `control_acc`, `selectivity`: Hewitt & Liang's (2019) control task, a class probe onto a random
  function of the current token (each token id is given a state drawn from the states' frequencies),
  and acc - control_acc;
- `by_position`: acc and ceiling_acc per bucket of positions [lo, hi), early positions having vaguer
  posteriors.
The random-initialised model's probes (the CLI's other control) are scored by this same function.
"""

from __future__ import annotations

import time

import torch

from nanollama.probe.fit import Features, fit_ridge, fit_softmax
from nanollama.probe.targets import Targets

CONTROL_SEED = 7  # the control task's random token -> state map


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 2), [2, 4), [4, 8), ...: doubling buckets up to seq_len."""
    edges, e = [0, 1], 2
    while e < seq_len:
        edges.append(e)
        e *= 2
    edges.append(seq_len)
    edges = sorted(set(min(x, seq_len) for x in edges))
    return list(zip(edges[:-1], edges[1:]))


def _by_position(hit: torch.Tensor, ceiling_hit: torch.Tensor) -> list[dict]:
    """hit, ceiling_hit: (B, S) booleans on the scored sequences."""
    out = []
    for lo, hi in position_buckets(hit.shape[1]):
        out.append(
            {
                "positions": [lo, hi],
                "acc": float(hit[:, lo:hi].float().mean()),
                "ceiling_acc": float(ceiling_hit[:, lo:hi].float().mean()),
            }
        )
    return out


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - residual / total sum of squares over every component of (N, K) targets."""
    residual = ((pred - target) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return float(1 - residual / total.clamp_min(1e-30))


def mean_kl(target: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean KL(target || exp(logp)) over rows of (N, K) distributions."""
    return float((torch.xlogy(target, target) - target * logp).sum(-1).mean())


def ceilings(targets: Targets) -> dict[str, dict]:
    """Per target, the exact posterior's scores on the held-out sequences (and the chance level)."""
    out = {}
    for name in targets.names:
        y_fit, _, y = targets.split(targets.labels[name])
        _, _, q = targets.split(targets.beliefs[name])
        k = q.shape[-1]
        p_true = q.gather(1, y[:, None])[:, 0].double()
        majority = int(torch.bincount(y_fit, minlength=k).argmax())
        out[name] = {
            "n_states": k,
            "ceiling_acc": float((q.argmax(-1) == y).float().mean()),
            "ceiling_ce": float(-p_true.clamp_min(1e-300).log().mean()),
            "chance_acc": float((y == majority).float().mean()),
        }
    return out


def control_labels(targets: Targets, name: str, vocab_size: int) -> torch.Tensor:
    """Hewitt & Liang's control task for target `name`: (B, S) labels, a fixed random function of x_t."""
    y_fit = targets.split(targets.labels[name])[0]
    k = targets.beliefs[name].shape[-1]
    freq = torch.bincount(y_fit, minlength=k).double().cpu()
    g = torch.Generator().manual_seed(CONTROL_SEED)
    table = torch.multinomial(freq / freq.sum(), vocab_size, replacement=True, generator=g).to(targets.tokens.device)
    return table[targets.tokens]


def score_layer(
    x: torch.Tensor, targets: Targets, ceiling: dict[str, dict], vocab_size: int, controls: bool = True
) -> dict[str, dict]:
    """Fit and score every probe of one layer: x (B, S, d) activations of targets.tokens. Returns name -> record."""
    start = time.perf_counter()
    x_fit, x_val, x_test = targets.split(x.float())
    feats = Features(x_fit, x_val)
    B_test, S = x.shape[0] - targets.n_train, x.shape[1]
    out = {}
    for name in targets.names:
        y_fit, y_val, y_test = targets.split(targets.labels[name])
        q_fit, q_val, q_test = targets.split(targets.beliefs[name])
        k = q_test.shape[-1]
        cls = fit_softmax(feats, y_fit, y_val, k)
        logits = cls(x_test)
        hit = logits.argmax(-1) == y_test
        ce = float(-torch.log_softmax(logits, -1).gather(1, y_test[:, None]).mean())
        ridge = fit_ridge(feats, q_fit, q_val)
        soft = fit_softmax(feats, q_fit, q_val, k)
        c = ceiling[name]
        rec = {
            **c,
            "acc": float(hit.float().mean()),
            "acc_frac": float(hit.float().mean()) / c["ceiling_acc"],
            "ce": ce,
            "belief_r2": r_squared(ridge(x_test), q_test),
            "belief_kl": mean_kl(q_test, torch.log_softmax(soft(x_test), -1)),
            "l2": {"class": cls.l2, "ridge": ridge.l2, "belief_softmax": soft.l2},
        }
        if controls:
            ctrl_fit, ctrl_val, ctrl_test = targets.split(control_labels(targets, name, vocab_size))
            ctrl = fit_softmax(feats, ctrl_fit, ctrl_val, k)
            rec["control_acc"] = float((ctrl(x_test).argmax(-1) == ctrl_test).float().mean())
            rec["selectivity"] = rec["acc"] - rec["control_acc"]
        ceiling_hit = targets.split(targets.beliefs[name])[2].argmax(-1) == y_test
        rec["by_position"] = _by_position(hit.view(B_test, S), ceiling_hit.view(B_test, S))
        out[name] = rec
    fit_s = time.perf_counter() - start
    for rec in out.values():
        rec["fit_s"] = fit_s  # the whole layer's fits (they share one Features)
    return out
