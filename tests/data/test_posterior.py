"""GSSM.posterior: the filtered belief against a dense float64 forward filter over hmm(), and its calibration."""

from pathlib import Path

import numpy as np
import pytest
import torch

from nanollama import config
from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig
from nanollama.data.gssm import hmm as hmm_lib
from nanollama.data.gssm.hmm import joint_hmm
from nanollama.train.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "gssm").glob("*.yaml"))


def dense_filter(pi: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(z_t | x_<=t) for one sequence, (T, S): the textbook normalised forward recursion."""
    out = torch.empty(len(tokens), len(pi), dtype=torch.float64)
    belief = pi.clone()
    for t, x in enumerate(tokens.tolist()):
        joint = belief * emit[:, x]
        out[t] = joint / joint.sum()
        belief = out[t] @ trans
    return out


def graph(mode: str, kind: str) -> GSSMConfig:
    """Hidden nodes out of topological order (so config and forward layouts differ), a two-parent node."""
    ctx = "context" if mode == "context" else "default"
    return GSSMConfig(
        nodes=[
            NodeConfig("o", 6, 0.4, parents=["c", "a"], observed=True, mode=ctx),
            NodeConfig("c", 2, 0.3, parents=["b", "a"], kernel_type=kind, mode="default" if mode == "slow" else mode),
            NodeConfig("a", 3, 0.5, kernel_type=kind, mode=mode),
            NodeConfig("b", 2, 0.3, parents=["a"], kernel_type=kind),
        ]
    )


def marginal_of(joint: torch.Tensor, dims: list[int], k: int) -> torch.Tensor:
    full = joint.reshape(*joint.shape[:-1], *dims)
    lead = joint.dim() - 1
    return full.sum([lead + a for a in range(len(dims)) if a != k])


def check_against_dense(g: GSSM, tokens: torch.Tensor, seed: int) -> None:
    post = g.posterior(tokens, seed=seed)
    B, T = tokens.shape
    assert post.joint.shape == (B, T, int(np.prod(post.dims))) and post.joint.dtype == torch.float64
    for b in range(B):
        hmm = joint_hmm(g, g.sequence_kernels(seed, b)) if g.context else g.hmm()
        torch.testing.assert_close(post.joint[b], dense_filter(*hmm, tokens[b]), rtol=0, atol=1e-10)
    for k, name in enumerate(g.hidden_names):
        torch.testing.assert_close(post.marginals[name], marginal_of(post.joint, post.dims, k), rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_posterior_matches_a_dense_filter_on_every_shipped_config(path):
    cfg = config.load(TrainConfig, path)
    g = GSSM(cfg.data.gssm, seed=cfg.data.graph_seed)
    check_against_dense(g, g.sample(2, 12, seed=5), seed=5)


@pytest.mark.parametrize("mode,kind", [("default", "fullrank"), ("context", "product"), ("slow", "product")])
def test_posterior_matches_a_dense_filter_fullrank_and_context(mode, kind):
    g = GSSM(graph(mode, kind), seed=2)
    tokens = g.sample(5, 17, seed=9)
    check_against_dense(g, tokens, seed=9)
    if mode == "context":  # the oracle needs the sampling seed; another seed scores other kernels
        assert not torch.allclose(g.posterior(tokens, seed=10).joint, g.posterior(tokens, seed=9).joint)
        with pytest.raises(ValueError, match="seed"):
            g.posterior(tokens)


def test_sampled_states_are_in_the_support_and_the_posterior_is_calibrated():
    """The true z_t is a draw from p(z_t | x_<=t): it sits where the posterior has mass, and states drawn
    from the posterior have the true states' frequencies."""
    g = GSSM(graph("default", "product"), seed=4)
    tokens, hidden = g.sample(400, 30, seed=3, return_hidden=True)
    post = g.posterior(tokens, seed=3)
    true = torch.from_numpy(np.ravel_multi_index(hidden.reshape(-1, len(post.dims)).T.numpy(), post.dims))
    p = post.joint.reshape(-1, post.joint.shape[-1])
    p_true = p[torch.arange(len(true)), true]
    assert float((p_true < 1e-6).double().mean()) < 1e-3  # a wrong layout puts true states at ~0 often
    # calibration: E[p(z_true)] = E[sum_z p(z)^2] for a draw z_true ~ p
    diff = p_true - (p * p).sum(1)
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / len(diff) ** 0.5 + 1e-3
    drawn = torch.multinomial(p.float(), 1, generator=torch.Generator().manual_seed(0))[:, 0]
    n = p.shape[1]
    f_true = torch.bincount(true, minlength=n).double() / len(true)
    f_drawn = torch.bincount(drawn, minlength=n).double() / len(true)
    se = (f_true * (1 - f_true) / len(true)).sqrt() * 2**0.5
    assert bool(((f_true - f_drawn).abs() <= 5 * se + 2e-3).all())
    # per node: the marginal's expected frequency matches the truth too
    for k, name in enumerate(g.hidden_names):
        expected = post.marginals[name].reshape(-1, post.dims[k]).mean(0)
        seen = torch.bincount(hidden[..., k].reshape(-1), minlength=post.dims[k]).double() / len(true)
        torch.testing.assert_close(expected, seen, rtol=0, atol=0.02)


def test_posterior_limits_and_errors(monkeypatch):
    g = GSSM(graph("default", "product"), seed=1)
    tokens = g.sample(3, 8, seed=1)
    full = g.posterior(tokens)
    monkeypatch.setattr(hmm_lib, "MAX_POSTERIOR_STATES", 8)  # 12 joint states: over the limit now
    small = g.posterior(tokens)
    assert small.joint is None and set(small.marginals) == {"c", "a", "b"}
    for name in small.marginals:
        torch.testing.assert_close(small.marginals[name], full.marginals[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="12 states"):
        g.posterior(tokens, joint=True)
    with pytest.raises(ValueError, match="no hidden node"):
        GSSM(GSSMConfig(nodes=[NodeConfig("o", 5, 1.0, observed=True)]), seed=0).posterior(tokens % 5)
    with pytest.raises(ValueError, match="tokens must lie in"):
        g.posterior(tokens + 6)
