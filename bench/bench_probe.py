"""Probing: activation capture against a plain forward, and probe fitting time for 1e5 positions x dim 256.

Groups:
  probe-capture-<shape>  [plain] the model's forward under no_grad; [hooks] the same forward through
                         nanollama.probe.activations, keeping every block's residual output plus embed and
                         final_norm (hooks registered and removed per call, as the API does). Target (issue 14):
                         [hooks] within 10% of [plain].
  probe-capture-overhead-* [interleaved] [hooks] again, with `overhead_median` / `overhead_min` in extra_info
                         from 12 alternating (plain, hooks) pairs: the figure to read on a shared machine.
  probe-fit-N100000-d256 [features] standardisation + the two covariance eigendecompositions one layer's
                         probes share; [softmax] the class probe (8 states, 4 L2 values on a 16k-row path,
                         then the refit on all rows, L-BFGS); [ridge] the belief probe (7 L2 values, closed
                         form). The activations are 8 well-separated noisy states in 256 dimensions, 60k
                         fitting and 20k validation rows. Target: seconds on the CPU.

Threads: on the CPU torch runs on THREADS intra-op threads (NANOLLAMA_BENCH_THREADS, default 1: the
development machines have 2 shared cores); recorded in extra_info.

Shapes: CPU capture dim 256, 4 layers, 4 heads, vocab 64, B 8, S 256, float32; GPU capture dim 1024, 12 layers,
16 heads, vocab 256, B 8, S 1024, bf16.

Measured (2026-12-01, the 2-core AMD EPYC development VM, 1 thread, torch 2.13 CPU; other jobs shared the
cores, so single figures move by 2-4x with the load):
  fit, load average ~2.5: features 1.12 s, softmax 1.26 s, ridge 0.051 s (medians of 3): one layer's
    class probe on 1e5 x 256 in about 2.4 s; at load ~4.7 the same took 5.0 s, 4.6 s and 0.24 s.
  capture: the two variants timed one after the other swing by more than the effect (one run gave hooks
    1.16x plain, the next 0.63x); interleaved (test_probe_capture_overhead: plain, hooks, plain, ... 12
    pairs) the overhead was +4% (median) / -5% (minima) in a first run and -1.5% / -0.2% in a second:
    none measurable at this shape, within the 10% goal.
  GPU: not measured (no GPU was lent to this task).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from harness import DEVICE, measure

from nanollama.models.transformer import Transformer, TransformerConfig
from nanollama.probe import activations
from nanollama.probe.fit import Features, fit_ridge, fit_softmax

THREADS = int(os.environ.get("NANOLLAMA_BENCH_THREADS", "1"))
if DEVICE.type == "cpu":
    torch.set_num_threads(THREADS)

GPU = DEVICE.type == "cuda"
SHAPE = (
    dict(dim=1024, n_layers=12, n_heads=16, vocab_size=256, B=8, S=1024)
    if GPU
    else dict(dim=256, n_layers=4, n_heads=4, vocab_size=64, B=8, S=256)
)
DTYPE = torch.bfloat16 if GPU else torch.float32
N, D, K = 100_000, 256, 8


def _model() -> Transformer:
    s = SHAPE
    cfg = TransformerConfig(
        vocab_size=s["vocab_size"], dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"], max_seq_len=s["S"]
    )
    return Transformer(cfg).to(device=DEVICE, dtype=DTYPE).eval()


def _tokens() -> tuple[torch.Tensor]:
    return (torch.randint(0, SHAPE["vocab_size"], (SHAPE["B"], SHAPE["S"]), device=DEVICE),)


_MODEL = {}


def model() -> Transformer:
    if "m" not in _MODEL:
        _MODEL["m"] = _model()
    return _MODEL["m"]


def _plain(tokens):
    with torch.no_grad():
        return model()(tokens)


def _hooks(tokens):
    return activations(model(), tokens)  # every block's output, embed and final_norm


@pytest.mark.parametrize("variant", ["plain", "hooks"])
def test_probe_capture(benchmark, variant):
    s = SHAPE
    benchmark.group = f"probe-capture-dim{s['dim']}-L{s['n_layers']}-B{s['B']}-S{s['S']}"
    fn = _plain if variant == "plain" else _hooks
    measure(benchmark, fn, _tokens, dtype=DTYPE, shapes={"tokens": (s["B"], s["S"])}, threads=THREADS, **s)


def _interleaved_ratio(pairs: int = 12) -> dict:
    """hooks / plain from alternating calls, so that a load change on a shared machine hits both alike."""
    (tokens,) = _tokens()
    plain, hooks = [], []
    for fn in (_plain, _hooks):
        fn(tokens)
    for _ in range(pairs):
        for fn, times in ((_plain, plain), (_hooks, hooks)):
            if GPU:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(tokens)
            if GPU:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {
        "interleaved_pairs": pairs,
        "overhead_median": statistics.median(hooks) / statistics.median(plain) - 1,
        "overhead_min": min(hooks) / min(plain) - 1,
    }


@pytest.mark.parametrize("variant", ["interleaved"])
def test_probe_capture_overhead(benchmark, variant):
    """[hooks] timed again, with the interleaved overhead (hooks / plain - 1) in extra_info."""
    s = SHAPE
    benchmark.group = f"probe-capture-overhead-dim{s['dim']}-L{s['n_layers']}-B{s['B']}-S{s['S']}"
    info = _interleaved_ratio()
    measure(benchmark, _hooks, _tokens, dtype=DTYPE, shapes={"tokens": (s["B"], s["S"])}, threads=THREADS, **info)


def _synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, K, (N,), generator=g)
    x = torch.randn(K, D, generator=g)[z] * 0.2 + torch.randn(N, D, generator=g)
    return x.to(DEVICE), z.to(DEVICE)


_DATA = {}


def data():
    if "xz" not in _DATA:
        x, z = _synthetic()
        n_fit, n_val = int(0.6 * N), int(0.2 * N)
        _DATA["xz"] = (x[:n_fit], x[n_fit : n_fit + n_val], z[:n_fit], z[n_fit : n_fit + n_val])
        _DATA["feats"] = Features(_DATA["xz"][0], _DATA["xz"][1])
        _DATA["belief"] = torch.softmax(torch.cat([x[:n_fit], x[n_fit : n_fit + n_val]])[:, :K], -1)
    return _DATA


@pytest.mark.parametrize("variant", ["features", "softmax", "ridge"])
def test_probe_fit(benchmark, variant):
    benchmark.group = f"probe-fit-N{N}-d{D}"
    d = data()
    x_fit, x_val, z_fit, z_val = d["xz"]
    n_fit = x_fit.shape[0]
    if variant == "features":

        def fn():
            return Features(x_fit, x_val)
    elif variant == "softmax":

        def fn():
            return fit_softmax(d["feats"], z_fit, z_val, K)
    else:

        def fn():
            return fit_ridge(d["feats"], d["belief"][:n_fit], d["belief"][n_fit:])

    measure(benchmark, fn, tuple, warmup=1, target_s=0.1, shapes={"x": (N, D)}, classes=K, threads=THREADS)
