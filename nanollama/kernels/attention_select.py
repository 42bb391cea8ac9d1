"""backend="auto": pick the fastest attention backend by measuring it, once, and remember.

The choice is keyed by (mask kind, shape bucket, dtype, device, needs-grad): a shape bucket is
Sq and Skv rounded up to powers of two, the head dim, and whether heads are grouped. The first
call with a new key times every backend that supports it on the call's own shapes (forward, or
forward + backward when gradients are needed), keeps the fastest in memory and in a JSON file
under the cache directory, one file per (device name, torch version), and logs the timings.

Cache directory: $NANOLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/nanollama, else ~/.cache/nanollama.
NANOLLAMA_ATTENTION=flex|sdpa|flash|reference skips all this and forces one backend.

On the CPU, auto never considers flex: PyTorch has no CPU backward for it, eager flex is unfused
(slower than SDPA), and compiled flex costs about 25 s per new shape on our 2-core machines, far
more than any forward-only gain at CPU sizes. NANOLLAMA_ATTENTION=flex still forces it.
Under torch.compile tracing nothing is measured or read: flex on CUDA, sdpa elsewhere (or the
NANOLLAMA_ATTENTION override).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from nanollama.kernels.attention import BACKENDS, flash_supports, flex_available, run_backend

log = logging.getLogger("nanollama.kernels.attention")

STATS: Counter = Counter()  # "measured", "memory_hits", "disk_hits": lets tests see what happened
_MEMORY: dict[tuple[str, str], str] = {}  # (cache file, key) -> backend
_REFERENCE_MAX_SCORES = 1 << 28  # the reference materialises B*Hq*Sq*Skv scores: skip it above 1 GiB (fp32)


def clear_memory_cache() -> None:
    """Forget in-memory choices (the disk cache stays): the next call reads the file again."""
    _MEMORY.clear()


def override() -> str | None:
    """The backend forced by NANOLLAMA_ATTENTION, or None for auto."""
    value = os.environ.get("NANOLLAMA_ATTENTION", "auto").strip().lower() or "auto"
    if value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"NANOLLAMA_ATTENTION must be one of auto, {', '.join(BACKENDS)}; got {value!r}")
    return value


def _cache_dir_str() -> str:
    # plain strings: this runs on every auto call, where pathlib costs more than the lookup
    if os.environ.get("NANOLLAMA_CACHE_DIR"):
        return os.environ["NANOLLAMA_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nanollama")


def cache_dir() -> Path:
    """$NANOLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/nanollama, else ~/.cache/nanollama."""
    return Path(_cache_dir_str())


@functools.cache
def device_name(device: torch.device) -> str:
    """'NVIDIA H200' on CUDA; the processor model and thread count on the CPU (timings differ by both)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{device.type} {model} {torch.get_num_threads()} threads"


@functools.cache
def _file_name(device: torch.device) -> str:
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{device_name(device)}-torch{torch.__version__}")
    return f"attention-{slug}.json"


def cache_file(device: torch.device) -> Path:
    """The JSON file holding this device's choices (one per device name and torch version)."""
    return Path(_cache_dir_str(), _file_name(device))


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def unsupported(backend: str, q, k, mask, grad: bool) -> str | None:
    """None when `backend` can run this call, else why not."""
    if backend == "flex":
        if not flex_available():
            return "this torch has no FlexAttention"
        if grad and q.device.type == "cpu":
            return "flex has no backward on the CPU"
        return None
    if backend == "flash":
        return flash_supports(q, k, mask)
    return None  # sdpa and the reference take every mask


def selection_key(q, k, mask, grad: bool) -> str:
    B, Hq, Sq, D = q.shape
    Hk, Skv = k.shape[1], k.shape[2]

    def bucket(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    kind = "none" if mask is None else mask.kind
    dtype = str(q.dtype).removeprefix("torch.")
    return f"{kind}|q{bucket(Sq)}|kv{bucket(Skv)}|d{D}|g{Hq // Hk}|{dtype}|{'fwd+bwd' if grad else 'fwd'}"


def candidates(q, k, mask, grad: bool) -> list[str]:
    names = [b for b in BACKENDS if unsupported(b, q, k, mask, grad) is None]
    if q.device.type == "cpu" and "flex" in names:
        names.remove("flex")  # see the module docstring
    B, Hq, Sq, _ = q.shape
    if len(names) > 1 and B * Hq * Sq * k.shape[2] > _REFERENCE_MAX_SCORES:
        names.remove("reference")  # too big to win, big enough to run out of memory
    return names


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data.get("choices", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or half-written by someone else: measure again


def _write(path: Path, device: torch.device, key: str, entry: dict) -> None:
    """Merge one entry into the file, written to a temporary name and renamed (never half-written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        choices = _read(path)
        choices[key] = entry
        data = {"device": device_name(device), "torch": torch.__version__, "choices": choices}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        log.warning("attention: could not write the backend cache %s: %s", path, e)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() after one warm-up call (which absorbs compilation)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(names: list[str], q, k, v, mask, scale, grad: bool) -> dict[str, float]:
    """Seconds per call for each backend on fresh copies of the inputs (the caller's graph is untouched)."""
    reps = 5 if q.device.type == "cuda" else 2
    qq, kk, vv = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    g = torch.randn_like(q) if grad else None
    results: dict[str, float] = {}
    # Identity hooks on top of the stack isolate the timing runs from any saved-tensor hooks of the
    # caller: inside an activation-checkpointed block the checkpoint's own hooks would otherwise
    # count (and, while recomputing, stop) our throwaway forward passes.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for name in names:
            _time_backend(name, qq, kk, vv, g, mask, scale, grad, reps, results)
    return results


def _time_backend(name, qq, kk, vv, g, mask, scale, grad: bool, reps: int, results: dict[str, float]) -> None:
    """Time one backend into results[name]; a backend that cannot run here is skipped with a warning."""

    def call():
        with torch.set_grad_enabled(grad):
            out = run_backend(name, qq, kk, vv, mask, scale)
            if grad:
                out.backward(g)
                for t in (qq, kk, vv):
                    t.grad = None

    try:
        results[name] = time_call(call, qq.device, reps)
    except Exception as e:  # a backend that cannot run here (unsupported, out of memory) loses
        log.warning("attention auto: backend %s failed while measuring (%s); skipping it", name, e)
        if qq.device.type == "cuda":
            torch.cuda.empty_cache()


def choose_backend(q, k, v, mask, scale) -> str:
    """The backend for this call under backend='auto' (see the module docstring)."""
    grad = needs_grad(q, k, v)
    forced = override()
    if forced is not None:
        reason = unsupported(forced, q, k, mask, grad)
        if reason:
            raise RuntimeError(f"NANOLLAMA_ATTENTION={forced} cannot run this call: {reason}")
        return forced
    names = candidates(q, k, mask, grad)
    if len(names) == 1:
        return names[0]
    if torch.compiler.is_compiling():  # no timing or file reads inside a trace: a fixed rule
        return "flex" if q.device.type == "cuda" and "flex" in names else "sdpa"
    key = selection_key(q, k, mask, grad)
    memory_key = (os.path.join(_cache_dir_str(), _file_name(q.device)), key)
    chosen = _MEMORY.get(memory_key)
    if chosen in names:
        STATS["memory_hits"] += 1
        return chosen
    path = cache_file(q.device)
    entry = _read(path).get(key)
    if isinstance(entry, dict) and entry.get("backend") in names:
        STATS["disk_hits"] += 1
        _MEMORY[memory_key] = entry["backend"]
        log.debug("attention auto: %s -> %s (from %s)", key, entry["backend"], path)
        return entry["backend"]
    times = measure(names, q, k, v, mask, scale, grad)
    if not times:
        raise RuntimeError(f"attention auto: every backend failed for {key}")
    chosen = min(times, key=times.get)
    STATS["measured"] += 1
    _MEMORY[memory_key] = chosen
    ms = {name: round(t * 1e3, 4) for name, t in times.items()}
    _write(path, q.device, key, {"backend": chosen, "ms": ms})
    log.info("attention auto: %s -> %s (ms: %s)", key, chosen, ms)
    return chosen
