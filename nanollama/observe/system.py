"""What the logs say about the machine: hostname, process and GPU memory, GPU utilisation and power."""

from __future__ import annotations

import socket
from pathlib import Path

import torch


def hostname() -> str:
    return socket.gethostname()


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_stats() -> list[dict] | None:
    """Used/total memory, utilisation and power of this host's GPUs via NVML; None without GPUs."""
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver library, or NVML refuses: report nothing rather than crash
        return None
    stats = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        try:
            power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except pynvml.NVMLError:
            power = None
        stats.append({"gpu": index, "mem_used": mem.used, "mem_total": mem.total, "util": util.gpu, "power_w": power})
    return stats


def memory_record(device: torch.device, local_rank: int) -> dict:
    """Memory fields of a metrics record; GPU fields are null on the CPU."""
    on_gpu = device.type == "cuda"
    return {
        "rss_bytes": rss_bytes(),
        "cuda_max_allocated": torch.cuda.max_memory_allocated(device) if on_gpu else None,
        "cuda_max_reserved": torch.cuda.max_memory_reserved(device) if on_gpu else None,
        "gpus": gpu_stats() if on_gpu and local_rank == 0 else None,  # one rank per host asks NVML
    }
