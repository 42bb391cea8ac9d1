"""The one helper every benchmark in bench/ uses: device facts, a peak table, timing, extra_info.

A benchmark builds its inputs with a function (called again for input rotation), names the op
to time, and says how many bytes it moves and/or FLOPs it does per call; `measure` does the rest:

    def test_op_eager(benchmark):
        q = ...
        measure(benchmark, op_ref, lambda: (torch.randn(..., device=DEVICE),),
                bytes=2 * q.numel() * q.element_size(), dtype=torch.bfloat16, shapes={"q": (B, S, H, D)})

What `measure` guarantees (the conventions in bench/README.md):
- warm-up (compile, autotune, allocator) runs outside the timed region;
- on a GPU every timed round ends with torch.cuda.synchronize(), and inputs rotate over enough
  independent sets that together they exceed twice the L2 cache (so no call reads warm cache);
- extra_info gets shapes, dtype, device, GB/s and/or TFLOP/s from the median time, the fraction of
  the device's datasheet peak (and of the measured ceiling where bench/README.md has one), and peak
  memory of one call (torch.cuda.max_memory_allocated on a GPU, the process's peak RSS on the CPU).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from nanollama.utils.devices import Peak, peak_for
from nanollama.utils.devices import device_name as _device_name

__all__ = ["DEVICE", "Peak", "device_name", "measure", "peak_for", "requires_gpu", "tensor_bytes"]

# The device benchmarks run on: the GPU when there is one (the point of the suite), else the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# One peak table in the repo: nanollama.utils.devices (Peak, peak_for, device_name are re-exported here
# for the benchmark files).
_DEFAULT_L2_MB = 64.0  # unknown GPU: rotate over 128 MB, enough for every current part but B200

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def device_name(device: torch.device | str = DEVICE) -> str:
    """nanollama.utils.devices.device_name, on the benchmark device by default."""
    return _device_name(device)


def requires_gpu(what: str = "Triton variants") -> None:
    """Skip the calling benchmark on the CPU (the Triton interpreter is not a performance path)."""
    if DEVICE.type != "cuda":
        pytest.skip(f"{what} are timed on a CUDA device only")


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the logical elements of these tensors (what a kernel reads or writes once)."""
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------- memory


def _rss_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(fn: Callable, args: Sequence, device: torch.device) -> dict[str, int]:
    """Peak memory of one call: absolute, and above what was allocated before it (inputs excluded)."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn(*args)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return {"peak_mem_bytes": peak, "call_mem_bytes": peak - before}
    before = _rss_bytes("VmRSS")
    reset = _reset_rss_peak()
    out = fn(*args)
    peak = _rss_bytes("VmHWM")
    del out
    if before is None or peak is None or not reset:
        return {}
    # RSS counts the whole process (libraries included); the difference is what the call added.
    return {"peak_mem_bytes": peak, "call_mem_bytes": max(peak - before, 0)}


class CudaGraphed:
    """`call()` captured once into a CUDA graph; calling the object replays it (no host work but the replay).

    As torch.cuda.graphs requires, the call first runs a few times on a side stream (Triton compiles,
    the caching allocator and autograd settle) and only then is captured.
    """

    def __init__(self, call: Callable[[], Any]):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = call()  # kept alive with the graph, which writes them on every replay

    def __call__(self) -> None:
        self.graph.replay()


def graphed_inputs(fn: Callable[..., Any], make_inputs: Callable[[], Sequence[Any]]) -> Callable[[], tuple]:
    """For a "-graph" variant: make_inputs whose every input set also carries its own CUDA graph of
    fn on that set; time it with `measure(benchmark, replay_graph, graphed_inputs(fn, make), ...)`.
    Memory columns then mean nothing: a graph's outputs live in its private pool."""

    def make_graphed() -> tuple:
        args = tuple(make_inputs())
        return (*args, CudaGraphed(lambda: fn(*args)))

    return make_graphed


def replay_graph(*args: Any) -> None:
    """The timed call of a "-graph" variant: replay the graph that ends the input set."""
    args[-1]()


# ----------------------------------------------------------------------------- timing


def measure(
    benchmark: Any,
    fn: Callable[..., Any],
    make_inputs: Callable[[], Sequence[Any]],
    *,
    bytes: int | None = None,
    flops: int | None = None,
    dtype: torch.dtype | None = None,
    shapes: dict[str, Any] | None = None,
    warmup: int = 3,
    target_s: float | None = None,
    **info: Any,
) -> dict[str, Any]:
    """Time `fn(*make_inputs())` with pytest-benchmark and fill benchmark.extra_info; returns it.

    bytes / flops: per call (the formula belongs in the benchmark's docstring). dtype picks the
    TFLOP/s peak. `info` is copied into extra_info as is. The median time is per call.
    """
    device = DEVICE
    first = tuple(make_inputs())
    for _ in range(warmup):  # compile, autotune and allocator warm-up happen here, untimed
        fn(*first)
    _sync(device)
    memory = _peak_memory(fn, first, device)

    name = device_name(device)
    peak = peak_for(name) if device.type == "cuda" else None
    sets = [first]
    if device.type == "cuda":
        set_bytes = max(sum(tensor_bytes(a) for a in first if isinstance(a, torch.Tensor)), 1)
        cache = 2 * (peak.l2_mb if peak and peak.l2_mb else _DEFAULT_L2_MB) * 1e6
        count = min(math.ceil(cache / set_bytes), 64)
        sets += [tuple(make_inputs()) for _ in range(count - 1)]
    # On a GPU one round launches `calls` back to back and synchronises once, so the ~10 us of a
    # synchronize is spread over the calls; the timer divides by `iterations` itself.
    calls = len(sets) * max(1, math.ceil(8 / len(sets))) if device.type == "cuda" else 1
    state = {"i": 0}

    def step() -> None:
        i = state["i"]
        state["i"] = i + 1
        fn(*sets[i % len(sets)])
        if device.type == "cuda" and (i + 1) % calls == 0:
            torch.cuda.synchronize(device)

    # Size the run from one untimed round: at least 3 rounds, about target_s seconds in all.
    target_s = target_s if target_s is not None else (0.25 if device.type == "cuda" else 0.5)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    _sync(device)
    per_round = max(time.perf_counter() - start, 1e-7)
    rounds = int(min(max(target_s / per_round, 3), 200))
    benchmark.pedantic(step, rounds=rounds, iterations=calls, warmup_rounds=0)
    if getattr(benchmark, "stats", None) is None:  # --benchmark-disable: ran once as a plain test
        return {}

    seconds = benchmark.stats.stats.median
    extra: dict[str, Any] = {
        "device": name,
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)) if dtype is not None else None,
        "shapes": {k: list(v) if isinstance(v, (tuple, torch.Size)) else v for k, v in (shapes or {}).items()},
        "input_sets": len(sets),
        "median_s": seconds,
        **memory,
    }
    if bytes is not None:
        gbs = bytes / seconds / 1e9
        extra.update(bytes=bytes, gb_per_s=round(gbs, 3))
        if peak is not None:
            if peak.hbm_gbs:
                extra["frac_peak_bw"] = round(gbs / peak.hbm_gbs, 4)
            if peak.measured_gbs:
                extra["frac_measured_bw"] = round(gbs / peak.measured_gbs, 4)
    if flops is not None:
        tflops = flops / seconds / 1e12
        extra.update(flops=flops, tflop_per_s=round(tflops, 4))
        key = _DTYPE_NAMES.get(dtype, "")
        if peak is not None and key in peak.tflops:
            extra["frac_peak_flops"] = round(tflops / peak.tflops[key], 4)
            if peak.measured_tflops and key in peak.measured_tflops:
                extra["frac_measured_flops"] = round(tflops / peak.measured_tflops[key], 4)
    extra.update(info)
    benchmark.extra_info.update(extra)
    if os.environ.get("NANOLLAMA_BENCH_VERBOSE"):
        print(f"\n{benchmark.name}: {extra}")
    return extra
