"""Selection policy, in one place: which implementation runs, for every kernel in nanollama.kernels.

Kernels (RoPE, decode):
NANOLLAMA_KERNELS=auto (default): Triton on CUDA tensors, the eager reference elsewhere.
NANOLLAMA_KERNELS=triton: Triton always; on CPU tensors that needs Triton's interpreter, which
    must be switched on (TRITON_INTERPRET=1) before the kernels are defined, at the first Triton
    call (or any earlier import of triton), since triton.jit picks the interpreter when it decorates.
NANOLLAMA_KERNELS=reference: the eager reference always. float64 inputs always take the
    reference (the Triton kernels take 16- and 32-bit floats), on the CPU as on CUDA.

Attention backends (`choose_backend`, for backend="auto"):
NANOLLAMA_ATTENTION=flex|sdpa|flash|reference forces one; NANOLLAMA_FLEX_COMPILE=auto|1|0 says
    whether flex runs compiled (auto: on CUDA). Otherwise the fastest supporting backend, measured
    once per key (mask kind, Sq and Skv rounded up to powers of two, head dim, GQA group, dtype,
    needs-grad) and remembered in a per-process dict and in a JSON file per (device name, torch
    version) under $NANOLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/nanollama, else ~/.cache/nanollama.
    On the CPU auto never considers flex: PyTorch has no CPU backward for it, eager flex is unfused
    (slower than SDPA), and compiled flex costs about 25 s per new shape on our 2-core machines.
    Under torch.compile tracing nothing is measured or read: flex on CUDA, sdpa elsewhere.

Under torch.compile the environment is read once, when a function is traced: the choice is baked
into the graph (the settings functions are marked constant so Dynamo does not trace os.environ).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections import Counter
from pathlib import Path

import torch

from nanollama.kernels._triton import constant_to_dynamo, module_found
from nanollama.kernels.attention_backends import BACKENDS, build, run, unsupported
from nanollama.utils.devices import device_name
from nanollama.utils.fileio import write_atomic

__all__ = [
    "MODES",
    "cache_file",
    "choose_backend",
    "flex_compiled",
    "interpreter_on",
    "mode",
    "module_found",
    "override",
    "triton_available",
    "use_triton",
]

MODES = ("auto", "triton", "reference")
log = logging.getLogger("nanollama.kernels.attention")


@constant_to_dynamo
def mode() -> str:
    """The dispatch mode from the environment (read on every eager call, so tests can change it)."""
    value = os.environ.get("NANOLLAMA_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"NANOLLAMA_KERNELS must be one of {', '.join(MODES)}; got {value!r}")
    return value


@constant_to_dynamo
def triton_available() -> bool:
    return module_found("triton")


@constant_to_dynamo
def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run kernels with these versions (None: it can)."""
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        # numpy 2.4 refuses int() of a 1-element array, which these interpreters do for every loop
        # bound (triton-lang/triton#9171, fixed in Triton 3.7)
        return (
            f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version}: "
            "install 'numpy<2.4' or 'triton>=3.7'"
        )
    return None


@functools.cache
def _interpreter_problem_here() -> str | None:
    import numpy
    import triton

    return interpreter_problem(triton.__version__, numpy.__version__)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors, False for the eager reference.

    Raises RuntimeError when NANOLLAMA_KERNELS=triton cannot be honoured (no triton; CPU tensors
    without the interpreter, or with an interpreter that cannot run here).
    """
    chosen = mode()
    if chosen == "reference" or tensors[0].dtype == torch.float64:  # no float64 kernels: the reference
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("NANOLLAMA_KERNELS=triton but triton is not installed (pip install triton)")
    if not on_cuda and not interpreter_on():
        raise RuntimeError(
            "NANOLLAMA_KERNELS=triton on CPU tensors needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before the first Triton call (and before importing triton)"
        )
    if not on_cuda and (problem := _interpreter_problem_here()):
        raise RuntimeError(f"NANOLLAMA_KERNELS=triton on CPU tensors: {problem}")
    return True


# -- attention: overrides and the measured auto choice --------------------------------------------
STATS: Counter = Counter()  # "measured", "memory_hits", "disk_hits": lets tests see what happened
_MEMORY: dict[str, str] = {}  # "<cache file>|<key>" -> backend: the measured choice, per process
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


def flex_compiled(device: torch.device) -> bool:
    """Whether flex runs compiled on this device: NANOLLAMA_FLEX_COMPILE=auto (CUDA only) | 1 | 0."""
    value = os.environ.get("NANOLLAMA_FLEX_COMPILE", "auto").strip().lower() or "auto"
    if value not in ("auto", "0", "1"):
        raise ValueError(f"NANOLLAMA_FLEX_COMPILE must be auto, 0 or 1; got {value!r}")
    return device.type == "cuda" if value == "auto" else value == "1"


def cache_dir() -> Path:
    """$NANOLLAMA_CACHE_DIR, else $XDG_CACHE_HOME/nanollama, else ~/.cache/nanollama."""
    if os.environ.get("NANOLLAMA_CACHE_DIR"):
        return Path(os.environ["NANOLLAMA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "nanollama")


def cache_file(device: torch.device) -> Path:
    """The JSON file holding this device's choices (one per device name and torch version)."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{device_name(device)}-torch{torch.__version__}")
    return cache_dir() / f"attention-{slug}.json"


def selection_key(mask, q_shape, k_shape, dtype, grad: bool) -> str:
    B, Hq, Sq, D = q_shape
    Hk, Skv = k_shape[1], k_shape[2]

    def bucket(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())

    kind = "none" if mask is None else mask.kind
    name = str(dtype).removeprefix("torch.")
    return f"{kind}|q{bucket(Sq)}|kv{bucket(Skv)}|d{D}|g{Hq // Hk}|{name}|{'fwd+bwd' if grad else 'fwd'}"


def candidates(mask, q_shape, k_shape, dtype, device, grad: bool) -> list[str]:
    names = [b for b in BACKENDS if unsupported(b, mask, q_shape, k_shape, dtype, device, grad) is None]
    if device.type == "cpu" and "flex" in names:
        names.remove("flex")  # see the module docstring
    B, Hq, Sq, _ = q_shape
    if len(names) > 1 and B * Hq * Sq * k_shape[2] > _REFERENCE_MAX_SCORES:
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
    """Merge one entry into the file (written atomically: never half-written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        choices = _read(path)
        choices[key] = entry
        data = {"device": device_name(device), "torch": torch.__version__, "choices": choices}
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
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
    times.sort()  # the median, without importing statistics (and decimal) into every import of the kernels
    return (times[(reps - 1) // 2] + times[reps // 2]) / 2


def measure(names: list[str], mask, q_shape, k_shape, dtype, device, scale, grad: bool) -> dict[str, float]:
    """Seconds per call for each backend, on random inputs of the call's shapes (no caller graph involved)."""
    reps = 5 if device.type == "cuda" else 2
    q = torch.randn(q_shape, dtype=dtype, device=device, requires_grad=grad)
    k, v = (torch.randn(k_shape, dtype=dtype, device=device, requires_grad=grad) for _ in range(2))
    g = torch.randn_like(q) if grad else None
    results: dict[str, float] = {}
    # Identity hooks on top of the stack isolate the timing runs from any saved-tensor hooks of the
    # caller: inside an activation-checkpointed block the checkpoint's own hooks would otherwise
    # count (and, while recomputing, stop) our throwaway forward passes.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for name in names:
            try:
                prepared = build(name, mask, q_shape[0], q_shape[2], k_shape[2], device)

                def call(prepared=prepared):
                    with torch.set_grad_enabled(grad):
                        out = run(prepared, q, k, v, scale, flex_compiled(device))
                        if grad:
                            out.backward(g)
                            for t in (q, k, v):
                                t.grad = None

                results[name] = time_call(call, device, reps)
            except Exception as e:  # a backend that cannot run here (unsupported, out of memory) loses
                log.warning("attention auto: backend %s failed while measuring (%s); skipping it", name, e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return results


def choose_backend(mask, q_shape, k_shape, dtype, device, grad: bool, scale=None) -> str:
    """The backend for a call under backend='auto' (see the module docstring)."""
    forced = override()
    if forced is not None:
        reason = unsupported(forced, mask, q_shape, k_shape, dtype, device, grad)
        if reason:
            raise RuntimeError(f"NANOLLAMA_ATTENTION={forced} cannot run this call: {reason}")
        return forced
    names = candidates(mask, q_shape, k_shape, dtype, device, grad)
    if len(names) == 1:
        return names[0]
    if torch.compiler.is_compiling():  # no timing or file reads inside a trace: a fixed rule
        return "flex" if device.type == "cuda" and "flex" in names else "sdpa"
    key = selection_key(mask, q_shape, k_shape, dtype, grad)
    path = cache_file(device)
    memory_key = f"{path}|{key}"
    chosen = _MEMORY.get(memory_key)
    if chosen in names:
        STATS["memory_hits"] += 1
        return chosen
    entry = _read(path).get(key)
    if isinstance(entry, dict) and entry.get("backend") in names:
        STATS["disk_hits"] += 1
        _MEMORY[memory_key] = entry["backend"]
        log.debug("attention auto: %s -> %s (from %s)", key, entry["backend"], path)
        return entry["backend"]
    times = measure(names, mask, q_shape, k_shape, dtype, device, scale, grad)
    if not times:
        raise RuntimeError(f"attention auto: every backend failed for {key}")
    chosen = min(times, key=times.get)
    STATS["measured"] += 1
    _MEMORY[memory_key] = chosen
    ms = {name: round(t * 1e3, 4) for name, t in times.items()}
    _write(path, device, key, {"backend": chosen, "ms": ms})
    log.info("attention auto: %s -> %s (ms: %s)", key, chosen, ms)
    return chosen
