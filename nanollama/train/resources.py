"""What a training process may use of its machine: CPU threads, and whether the model fits in memory.

Both are decided before anything big is built, and logged: on a shared 2-core machine torch's
default intra-op threads (one per core it sees, whatever the affinity and the other ranks) made
training 10-20x slower, and a model too large for memory should be a one-line refusal with the
numbers, not an out-of-memory kill minutes later.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from nanollama.config import ConfigError

# AdamW in fp32: parameter, gradient, exp_avg and exp_avg_sq, 4 bytes each.
BYTES_PER_PARAM = 16


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_threads(configured: int | None, environ: dict | None = None) -> tuple[int, str]:
    """(intra-op threads for this process, where the number comes from).

    The `threads` key wins, then OMP_NUM_THREADS (the user's explicit choice, which torch reads at
    start), else the available cores shared among this machine's ranks (LOCAL_WORLD_SIZE, set by
    torchrun), at least 1: what torchtitan does, with the cores actually available rather than
    every core of the machine.
    """
    environ = os.environ if environ is None else environ
    if configured is not None:
        return configured, "threads"
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "OMP_NUM_THREADS"
    cores = available_cores()
    local = environ.get("LOCAL_WORLD_SIZE", "1")
    ranks = int(local) if local.isdigit() and int(local) >= 1 else 1
    return max(1, cores // ranks), f"{cores} available cores / {ranks} local rank{'s' if ranks > 1 else ''}"


def set_threads(configured: int | None) -> str:
    """Choose and set torch's intra-op thread count; returns the line to log."""
    threads, why = choose_threads(configured)
    torch.set_num_threads(threads)
    return f"threads: {threads} torch intra-op threads per process ({why})"


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(free bytes, what they are) on `device`; None when unknown."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return free, f"free on {device}"
        except RuntimeError:
            return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, ValueError, IndexError):
        pass
    return None


def model_bytes(spec, model_cfg) -> tuple[int, int]:
    """(parameter count, bytes of parameters + gradients + AdamW state + buffers), from a meta-device build."""
    with torch.device("meta"):
        model = spec.build(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, params * BYTES_PER_PARAM + buffers


def check_memory(spec, model_cfg, device: torch.device, world_size: int = 1, ranks_per_device: int = 1) -> None:
    """Refuse (ConfigError on `model`) a model whose training state cannot fit in the device's free memory.

    Counts parameters, gradients and AdamW moments in fp32 (sharded over `world_size` under FSDP;
    `ranks_per_device` processes share one memory, e.g. CPU ranks on one host) plus buffers;
    activations come on top, so this only refuses what cannot possibly run.
    """
    params, need = model_bytes(spec, model_cfg)
    need = need * ranks_per_device // max(world_size, 1)
    have = available_memory(device)
    if have is not None and need > have[0]:
        raise ConfigError(
            "model",
            f"{params / 1e6:,.1f}M parameters need about {need / 2**30:,.1f} GiB per device for fp32 weights, "
            f"gradients and AdamW state ({BYTES_PER_PARAM} bytes per parameter, before activations), but only "
            f"{have[0] / 2**30:,.1f} GiB is available ({have[1]}); make the model smaller or use more devices",
        )
