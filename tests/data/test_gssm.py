"""GSSM graph validation, sampler determinism and the sampler's agreement with the exact HMM."""

import functools
import importlib.util

import numpy as np
import pytest
import torch

from nanollama.config import ConfigError
from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig
from nanollama.data.gssm import graph as gssm_module
from nanollama.data.gssm.hmm import joint_hmm

BUILT = importlib.util.find_spec("nanollama._gssm_sampler") is not None
needs_cpp = pytest.mark.skipif(not BUILT, reason="nanollama._gssm_sampler is not built (run `make install`)")


def graph(*nodes: NodeConfig) -> GSSMConfig:
    return GSSMConfig(nodes=list(nodes))


def small(mode: str = "default", kernel_type: str = "product", observed_mode: str = "default") -> GSSMConfig:
    """Three hidden nodes (a root, a child, a sibling) and a 5-token observed node with two parents."""
    parents = [] if mode == "slow" else ["a"]
    return graph(
        NodeConfig("a", 3, 0.5, kernel_type=kernel_type),
        NodeConfig("b", 2, 0.5, parents=parents, mode=mode, kernel_type=kernel_type),
        NodeConfig("o", 5, 0.5, parents=["a", "b"], observed=True, mode=observed_mode, kernel_type=kernel_type),
    )


# ----------------------------------------------------------------------------- validation

BAD = {
    "self parent": (lambda: graph(NodeConfig("a", 2, parents=["a"]), NodeConfig("o", 2, observed=True)), "'a' -> 'a'"),
    "duplicate parent": (
        lambda: graph(NodeConfig("a", 2), NodeConfig("o", 2, parents=["a", "a"], observed=True)),
        "node 'o': parent 'a' is listed twice",
    ),
    "cycle behind a node": (
        lambda: graph(
            NodeConfig("x", 2, parents=["b"]),
            NodeConfig("a", 2, parents=["b"]),
            NodeConfig("b", 2, parents=["a"]),
            NodeConfig("o", 2, parents=["x"], observed=True),
        ),
        "cycle: 'b' -> 'a' -> 'b'",
    ),
    "cycle": (
        lambda: graph(
            NodeConfig("a", 2, parents=["b"]),
            NodeConfig("b", 2, parents=["a"]),
            NodeConfig("o", 2, parents=["a"], observed=True),
        ),
        "'a'",
    ),
    "unknown parent": (lambda: graph(NodeConfig("a", 2, parents=["zz"]), NodeConfig("o", 2, observed=True)), "'a'"),
    "no observed": (lambda: graph(NodeConfig("a", 2), NodeConfig("b", 2)), "observed"),
    "two observed": (lambda: graph(NodeConfig("a", 2, observed=True), NodeConfig("b", 2, observed=True)), "'a'"),
    "state_dim": (lambda: NodeConfig("h", 0), "'h'"),
    "alpha": (lambda: NodeConfig("h", 3, alpha=0.0), "'h'"),
    "slow with parents": (lambda: NodeConfig("h", 3, parents=["a"], mode="slow"), "'h'"),
    "observed slow": (lambda: NodeConfig("o", 3, mode="slow", observed=True), "'o'"),
    "observed dead": (lambda: NodeConfig("o", 3, mode="dead", observed=True), "'o'"),
    "observed as parent": (lambda: graph(NodeConfig("a", 2, parents=["o"]), NodeConfig("o", 2, observed=True)), "'a'"),
    "duplicate name": (lambda: graph(NodeConfig("a", 2), NodeConfig("a", 2), NodeConfig("o", 2, observed=True)), "'a'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_graphs_raise_naming_the_node(case):
    make, needle = BAD[case]
    with pytest.raises(ConfigError, match=needle):
        make()


def test_bad_sample_arguments():
    g = GSSM(small(), seed=0)
    for kwargs, needle in [({"batch_size": 0}, "batch_size"), ({"seq_len": -1}, "seq_len"), ({"seed": -3}, "seed")]:
        args = {"batch_size": 2, "seq_len": 3, "seed": 1} | kwargs
        with pytest.raises(ValueError, match=needle):
            g.sample(**args)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", ["default", "context"])
def test_sampling_is_deterministic_per_seed(mode):
    cfg = small(mode)
    x, h = GSSM(cfg, seed=3).sample(6, 40, seed=7, return_hidden=True, backend="numpy")
    y, k = GSSM(cfg, seed=3).sample(6, 40, seed=7, return_hidden=True, backend="numpy")
    assert x.dtype == torch.int64 and x.shape == (6, 40) and h.shape == (6, 40, 2)
    assert torch.equal(x, y) and torch.equal(h, k)
    assert not torch.equal(x, GSSM(cfg, seed=3).sample(6, 40, seed=8, backend="numpy"))
    assert not torch.equal(x, GSSM(cfg, seed=4).sample(6, 40, seed=7, backend="numpy"))
    # sequence b depends on neither the batch size nor the length asked for
    z = GSSM(cfg, seed=3).sample(2, 25, seed=7, backend="numpy")
    assert torch.equal(z, x[:2, :25])
    # nor on where the call starts in the seed's stream
    w, v = GSSM(cfg, seed=3).sample(3, 40, seed=7, return_hidden=True, backend="numpy", first=2)
    assert torch.equal(w, x[2:5]) and torch.equal(v, h[2:5])
    assert 0 <= int(x.min()) and int(x.max()) < 5 and int(h[..., 0].max()) < 3 and int(h[..., 1].max()) < 2


def test_vocab_size_and_hidden_layout():
    g = GSSM(small(), seed=0)
    assert g.vocab_size == 5 and g.hidden_names == ["a", "b"]


def test_hmm_refuses_context_and_huge_graphs():
    with pytest.raises(ValueError, match="context"):
        GSSM(small("context"), seed=0).hmm()
    big = graph(*[NodeConfig(f"h{i}", 64) for i in range(3)], NodeConfig("o", 2, parents=["h0"], observed=True))
    with pytest.raises(ValueError, match="262144 states"):
        GSSM(big, seed=0).hmm()


def test_kernel_modes_shape_the_transitions():
    """slow rows peak on the diagonal, dead rows on state 0, and every kernel row is a distribution."""
    g = GSSM(
        graph(
            NodeConfig("s", 6, 0.3, mode="slow"),
            NodeConfig("d", 5, 0.3, parents=["s"], mode="dead"),
            NodeConfig("o", 4, 0.3, parents=["d"], observed=True),
        ),
        seed=2,
    )
    slow, dead = g.kernels[g.hidden[0]], g.kernels[g.hidden[1]]
    assert (slow[0].argmax(1) == np.arange(6)).all()
    assert all((m.argmax(1) == 0).all() for m in dead) and len(dead) == 2  # product: own state, parent
    for mats in g.kernels:
        for m in mats:
            assert np.allclose(m.sum(1), 1.0) and (m > 0).all()


# ----------------------------------------------------------------------------- sampler vs HMM


def exact_stats(pi: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, seq_len: int):
    """Per position t: P(x_t) (V,), and P(x_t, x_t+1) (V, V) for t < seq_len - 1, from the HMM."""
    single, pair, state = [], [], pi
    for t in range(seq_len):
        single.append(state @ emit)
        if t + 1 < seq_len:
            # P(x_t = a, x_t+1 = b) = sum_z state(z) E(z, a) sum_z' T(z, z') E(z', b)
            pair.append((state[:, None] * emit).T @ (trans @ emit))
        state = state @ trans
    return torch.stack(single), torch.stack(pair)


def empirical_stats(tokens: torch.Tensor, vocab: int):
    B, T = tokens.shape
    single = torch.stack([torch.bincount(tokens[:, t], minlength=vocab) for t in range(T)]).double() / B
    pair = (
        torch.stack(
            [torch.bincount(tokens[:, t] * vocab + tokens[:, t + 1], minlength=vocab * vocab) for t in range(T - 1)]
        )
        .double()
        .view(T - 1, vocab, vocab)
        / B
    )
    return single, pair


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """The largest TV over positions (each row of p and q is a distribution once flattened)."""
    return float(0.5 * (p - q).flatten(1).abs().sum(1).max())


@functools.cache
def expected_stats(mode: str, kind: str, seed: int, seqs: int, seq_len: int):
    """Exact single and pair statistics of sample(seqs, seq_len, seed=5) and of a control graph."""
    cfg = small(mode, kind, observed_mode="context" if mode == "context" else "default")
    g, other = GSSM(cfg, seed=seed), GSSM(cfg, seed=seed + 1)
    if mode == "context":
        stats = [exact_stats(*joint_hmm(g, g.sequence_kernels(5, b)), seq_len) for b in range(seqs)]
        single, pair = torch.stack([s for s, _ in stats]).mean(0), torch.stack([p for _, p in stats]).mean(0)
        return g, single, pair, exact_stats(*joint_hmm(other, other.sequence_kernels(6, 0)), seq_len)[1]
    return g, *exact_stats(*g.hmm(), seq_len), exact_stats(*other.hmm(), seq_len)[1]


CASES = [(mode, kind) for mode in ("default", "slow", "dead", "context") for kind in ("product", "fullrank")]


@pytest.mark.parametrize("mode,kind", CASES)
@pytest.mark.parametrize("backend", ["numpy", pytest.param("cpp", marks=needs_cpp)])
def test_sampler_matches_the_hmm(mode, kind, backend):
    """Empirical single and pair token frequencies vs the exact ones (TV), plus a control that the
    same check tells a differently seeded graph apart. Context graphs: the average of each
    sequence's own HMM."""
    seqs, seq_len = (4000, 4) if mode == "context" else (25000, 4)
    g, single, pair, control = expected_stats(mode, kind, 11, seqs, seq_len)
    tokens = g.sample(seqs, seq_len, seed=5, backend=backend)
    emp_single, emp_pair = empirical_stats(tokens, g.vocab_size)
    # sampling noise: TV ~ 0.4 * sum_k sqrt(p_k / N) <= 0.4 * sqrt(K / N); we allow 4x that
    bound = 4 * 0.4 * (g.vocab_size**2 / seqs) ** 0.5
    assert total_variation(emp_single, single) < bound / 2
    assert total_variation(emp_pair, pair) < bound
    assert total_variation(emp_pair, control) > bound


# ----------------------------------------------------------------------------- the compiled sampler


@needs_cpp
@pytest.mark.parametrize("mode,kind", [("default", "product"), ("dead", "fullrank"), ("slow", "product")])
def test_hidden_states_follow_the_hmm(mode, kind):
    """The joint hidden state (config order, mixed radix) at steps 1..3 has law pi T^(t-1)."""
    g = GSSM(small(mode, kind), seed=11)
    pi, trans, _ = g.hmm()
    _, hidden = g.sample(20000, 3, seed=3, return_hidden=True)
    dims = [g.nodes[j].dim for j in g.hidden]
    joint = hidden[..., 0] * dims[1] + hidden[..., 1]  # (B, T)
    law = pi
    for t in range(3):
        empirical = torch.bincount(joint[:, t], minlength=len(pi)).double() / len(joint)
        assert 0.5 * float((empirical - law).abs().sum()) < 0.02, t
        law = law @ trans


def test_package_uses_the_compiled_sampler(monkeypatch):
    assert gssm_module._extension() is not None, "nanollama._gssm_sampler exists but does not import"

    def refuse(*args, **kwargs):
        raise AssertionError("the numpy sampler ran although the compiled one is built")

    monkeypatch.setattr(GSSM, "_sample_numpy", refuse)
    assert GSSM(small(), seed=0).sample(3, 5, seed=1).shape == (3, 5)


@needs_cpp
@pytest.mark.parametrize("mode", ["default", "context"])
@pytest.mark.parametrize("table_limit", [gssm_module.TABLE_LIMIT, 0])  # 0: product nodes multiply factors per step
def test_cpp_equals_numpy_whatever_the_threads(mode, table_limit, monkeypatch):
    monkeypatch.setattr(gssm_module, "TABLE_LIMIT", table_limit)
    cfg = graph(
        NodeConfig("a", 5, 0.2),
        NodeConfig("d", 3, 0.4, mode="slow"),
        NodeConfig("b", 4, 0.3, parents=["a", "d"], mode=mode),
        NodeConfig("c", 3, 0.3, parents=["b"], kernel_type="fullrank", mode="dead"),
        NodeConfig("o", 7, 0.5, parents=["c", "a"], observed=True),
    )
    g = GSSM(cfg, seed=4)
    ref, ref_hidden = g.sample(13, 37, seed=9, return_hidden=True, backend="numpy")
    for threads in (1, 2, 5, 13, 64):
        x, h = g.sample(13, 37, seed=9, return_hidden=True, backend="cpp", threads=threads)
        assert torch.equal(x, ref) and torch.equal(h, ref_hidden), threads
    assert torch.equal(g.sample(5, 37, seed=9, backend="cpp", first=8), ref[8:])


def test_numpy_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(gssm_module, "_extension", gssm_module._extension.__wrapped__)
    monkeypatch.setitem(__import__("sys").modules, "nanollama._gssm_sampler", None)  # import fails
    g = GSSM(small(), seed=0)
    with caplog.at_level("WARNING", logger="nanollama.data.gssm"):
        x = g.sample(2, 3, seed=1)
    assert x.shape == (2, 3) and "numpy sampler" in caplog.text
    with pytest.raises(RuntimeError, match="not built"):
        g.sample(2, 3, seed=1, backend="cpp")


def test_errors_from_yaml_name_the_field_and_the_node():
    from nanollama.config import build

    data = {"nodes": [{"name": "h", "state_dim": 4}, {"name": "o", "state_dim": 0, "parents": ["h"], "observed": True}]}
    with pytest.raises(ConfigError, match=r"nodes\.1\.state_dim: node 'o'"):
        build(GSSMConfig, data)
    data["nodes"][1] |= {"state_dim": 3, "kernel_type": "lowrank"}
    with pytest.raises(ConfigError, match=r"nodes\.1\.kernel_type"):
        build(GSSMConfig, data)
