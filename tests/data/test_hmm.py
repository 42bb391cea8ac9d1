"""Exact likelihood: nll() against a plain dense float64 forward algorithm, and entropy_rate sanity."""

import importlib.util
import math

import pytest
import torch

from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig
from nanollama.data.gssm.hmm import joint_hmm

BUILT = importlib.util.find_spec("nanollama._gssm_sampler") is not None
needs_cpp = pytest.mark.skipif(not BUILT, reason="nanollama._gssm_sampler is not built (run `make install`)")


def dense_nll(pi: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(x_t | x_<t) for one sequence: the textbook scaled forward recursion over the joint state."""
    out = torch.empty(len(tokens), dtype=torch.float64)
    belief = pi.clone()  # law of the state emitting the next token given the tokens so far
    for t, x in enumerate(tokens.tolist()):
        joint = belief * emit[:, x]
        out[t] = -torch.log(joint.sum())
        belief = (joint / joint.sum()) @ trans
    return out


def config(mode: str, kind: str) -> GSSMConfig:
    """Hidden nodes listed out of topological order, a two-parent node and a childless one."""
    return GSSMConfig(
        nodes=[
            NodeConfig(
                "o", 6, 0.4, parents=["c", "a"], observed=True, mode="context" if mode == "context" else "default"
            ),
            NodeConfig("c", 2, 0.3, parents=["b", "a"], kernel_type=kind, mode=mode if mode != "slow" else "default"),
            NodeConfig("a", 3, 0.5, kernel_type=kind, mode=mode),
            NodeConfig("b", 2, 0.3, parents=[] if mode == "slow" else ["a"], kernel_type=kind, mode=mode),
            NodeConfig("z", 2, 0.3, parents=["c"], kernel_type=kind),
        ]
    )


@pytest.mark.parametrize("kind", ["product", "fullrank"])
@pytest.mark.parametrize("mode", ["default", "slow", "dead", "context"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_nll_matches_a_dense_forward(mode, kind, backend):
    g = GSSM(config(mode, kind), seed=3)
    tokens = g.sample(5, 23, seed=8)
    nll = g.nll(tokens, seed=8, backend=backend)
    assert nll.shape == (5, 23) and nll.dtype == torch.float64
    for b in range(5):
        hmm = joint_hmm(g, g.sequence_kernels(8, b)) if mode == "context" else g.hmm()
        torch.testing.assert_close(nll[b], dense_nll(*hmm, tokens[b]), rtol=1e-10, atol=1e-12)
    # float32 agrees to float32 precision; a wrong seed in context mode scores other kernels
    torch.testing.assert_close(g.nll(tokens, seed=8, dtype=torch.float32).double(), nll, rtol=1e-4, atol=1e-4)
    if mode == "context":
        assert not torch.allclose(g.nll(tokens, seed=9), nll)
        torch.testing.assert_close(g.nll(tokens[3:], seed=8, first=3, backend=backend), nll[3:], rtol=1e-12, atol=0)


WIDE = GSSMConfig(  # node sizes the compiled forward specialises (1..8, 16) and one it does not (9)
    nodes=[
        NodeConfig("a", 16, 0.3),
        NodeConfig("b", 9, 0.3, parents=["a"]),
        NodeConfig("c", 1, 0.3, parents=["b"]),
        NodeConfig("d", 7, 0.3, parents=["c", "a"]),
        NodeConfig("o", 11, 0.3, parents=["d", "b"], observed=True),
    ]
)


@needs_cpp
@pytest.mark.parametrize("mode", ["default", "context", "wide"])
def test_compiled_forward_equals_torch_whatever_the_threads(mode):
    """Batches that are not a multiple of the C++ block (16), several blocks per thread."""
    g = GSSM(WIDE if mode == "wide" else config(mode, "product"), seed=6)
    tokens = g.sample(37, 19, seed=2)
    ref = g.nll(tokens, seed=2, backend="torch")
    one = g.nll(tokens, seed=2, backend="cpp", threads=1)
    torch.testing.assert_close(one, ref, rtol=1e-12, atol=1e-12)
    for threads in (2, 3, 8):  # a sequence's arithmetic does not depend on its block or thread
        assert torch.equal(g.nll(tokens, seed=2, backend="cpp", threads=threads), one)
    with pytest.raises(RuntimeError, match="float64"):
        g.nll(tokens, seed=2, backend="cpp", dtype=torch.float32)


def test_nll_of_random_tokens_and_bad_input():
    g = GSSM(config("default", "product"), seed=1)
    tokens = torch.randint(0, 6, (4, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g.nll(tokens)[2], dense_nll(*g.hmm(), tokens[2]), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="tokens must lie in"):
        g.nll(tokens + 6)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        g.nll(tokens[0])
    with pytest.raises(ValueError, match="seed"):
        GSSM(config("context", "product"), seed=1).nll(tokens)


def test_a_graph_without_hidden_nodes_is_iid():
    g = GSSM(GSSMConfig(nodes=[NodeConfig("o", 5, 1.0, observed=True)]), seed=0)
    pi, trans, emit = g.hmm()
    assert pi.shape == (1,) and trans.shape == (1, 1) and emit.shape == (1, 5)
    tokens = g.sample(3, 9, seed=2)
    torch.testing.assert_close(g.nll(tokens), -emit[0, tokens].log())


@pytest.mark.gpu
def test_nll_on_cuda_matches_cpu():
    g = GSSM(config("dead", "product"), seed=3)
    tokens = g.sample(64, 50, seed=1)
    torch.testing.assert_close(g.nll(tokens.cuda()).cpu(), g.nll(tokens), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- entropy rate


def test_entropy_rate_of_iid_tokens_is_the_row_entropy():
    """One hidden state: tokens are iid draws from one row, whose entropy is the exact rate."""
    cfg = GSSMConfig(nodes=[NodeConfig("h", 1, 1.0), NodeConfig("o", 8, 0.5, parents=["h"], observed=True)])
    g = GSSM(cfg, seed=5)
    row = g.hmm()[2][0]
    exact = float(-(row * row.log()).sum())
    rate, err = g.entropy_rate(n_seqs=400, seq_len=64)
    assert 0 < err < 0.05 and abs(rate - exact) < 4 * err


def test_entropy_rate_orders_graphs_and_bounds():
    def rate(alpha: float, seed: int) -> tuple[float, float]:
        cfg = GSSMConfig(nodes=[NodeConfig("h", 8, alpha), NodeConfig("o", 16, alpha, parents=["h"], observed=True)])
        return GSSM(cfg, seed=seed).entropy_rate(n_seqs=128, seq_len=64)

    low, low_err = rate(0.05, 0)
    high, high_err = rate(5.0, 0)
    assert 0 < low < high < math.log(16)
    assert high - low > 4 * (low_err + high_err)
    # the estimate only depends on the sampling seed through its noise
    g = GSSM(GSSMConfig(), seed=2)
    a, b = g.entropy_rate(64, 64, seed=1), g.entropy_rate(64, 64, seed=2)
    assert abs(a[0] - b[0]) < 4 * (a[1] + b[1])
