"""GSSM throughput: the samplers (numpy reference vs C++) and the exact NLL (factorised vs dense forward).

Run: `pytest bench/bench_gssm.py --benchmark-only`. Each group pairs the fast path with its
baseline; extra_info records tokens/s = batch * seq_len / mean seconds per call, the shapes and
the threads. Targets (issue 3, 2 CPU cores): C++ sampler >= 10x numpy at 64 x 512; nll >= 1M
tokens/s on a 256-joint-state graph at 256 x 256.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig

BUILT = importlib.util.find_spec("nanollama._gssm_sampler") is not None
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

GRAPHS = {
    # one 64-state hidden node emitting 32 tokens
    "one_node": GSSMConfig(
        nodes=[NodeConfig("h", 64, 0.1), NodeConfig("tokens", 32, 0.1, parents=["h"], observed=True)]
    ),
    # four hidden nodes: a root, a slow clock, a two-parent product node and a fullrank one
    "four_nodes": GSSMConfig(
        nodes=[
            NodeConfig("a", 16, 0.1),
            NodeConfig("clock", 8, 0.1, mode="slow"),
            NodeConfig("b", 16, 0.1, parents=["a", "clock"]),
            NodeConfig("c", 8, 0.1, parents=["b"], kernel_type="fullrank"),
            NodeConfig("tokens", 32, 0.1, parents=["b", "c"], observed=True),
        ]
    ),
    # 4 x 4 x 4 x 4 = 256 joint hidden states
    "joint256": GSSMConfig(
        nodes=[
            NodeConfig("a", 4, 0.3),
            NodeConfig("b", 4, 0.3, parents=["a"]),
            NodeConfig("c", 4, 0.3, parents=["b"]),
            NodeConfig("d", 4, 0.3, parents=["a", "c"]),
            NodeConfig("tokens", 32, 0.3, parents=["c", "d"], observed=True),
        ]
    ),
}


def record(benchmark, batch: int, seq_len: int, **info) -> None:
    tokens_per_s = batch * seq_len / benchmark.stats.stats.mean
    benchmark.extra_info.update(
        tokens_per_s=round(tokens_per_s), batch=batch, seq_len=seq_len, threads=THREADS, device="cpu", **info
    )


def run_sampler(benchmark, graph: str, backend: str) -> None:
    if backend == "cpp" and not BUILT:
        pytest.skip("nanollama._gssm_sampler is not built (run `make install`)")
    g, (batch, seq_len) = GSSM(GSSMConfig(nodes=GRAPHS[graph].nodes), seed=0), (64, 512)
    seeds = iter(range(10**6))
    benchmark.group = f"gssm-sample-{graph}"
    benchmark.pedantic(lambda: g.sample(batch, seq_len, next(seeds), backend=backend), rounds=5, warmup_rounds=1)
    record(benchmark, batch, seq_len, graph=graph)


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_sample_one_node(benchmark, backend):
    run_sampler(benchmark, "one_node", backend)


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_sample_four_nodes(benchmark, backend):
    run_sampler(benchmark, "four_nodes", backend)


def dense_nll(pi: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The baseline: the scaled forward recursion with one dense (B, S) x (S, S) product per step."""
    B, T = tokens.shape
    belief = pi.expand(B, -1).clone()
    out = torch.empty(T, B, dtype=pi.dtype)
    emit_t = emit.T.contiguous()  # (V, S): a row gather per token
    for t in range(T):
        joint = belief * emit_t[tokens[:, t]]
        p = joint.sum(1)
        out[t] = p
        belief = (joint / p[:, None]) @ trans
    return -out.log().T


@pytest.mark.parametrize("impl", ["dense", "factorised", "factorised-torch", "factorised-torch-fp32"])
def test_nll_joint256(benchmark, impl):
    """[factorised]: what nll() does by default on the CPU (the compiled forward, float64, one thread
    per core); [factorised-torch]: the same factorisation as torch ops (the GPU path)."""
    if impl == "factorised" and not BUILT:
        pytest.skip("nanollama._gssm_sampler is not built (run `make install`)")
    g, (batch, seq_len) = GSSM(GRAPHS["joint256"], seed=0), (256, 256)
    tokens = g.sample(batch, seq_len, seed=1)
    if impl == "dense":
        pi, trans, emit = g.hmm()
        fn = lambda: dense_nll(pi, trans, emit, tokens)
    else:
        dtype = torch.float32 if impl.endswith("fp32") else torch.float64
        backend = "torch" if "torch" in impl else "cpp"
        fn = lambda: g.nll(tokens, dtype=dtype, backend=backend)
    benchmark.group = "gssm-nll-joint256"
    result = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    record(
        benchmark,
        batch,
        seq_len,
        graph="joint256",
        joint_states=256,
        torch_threads=torch.get_num_threads(),
        mean_nll=float(result.mean()),
    )
