"""What we know of each device: its name as logged, and its datasheet peaks (FLOP/s, bandwidth, L2).

Used for MFU/HFU in training, for the attention backend cache's file name, and by the benchmarks.
A device missing from the table has no peak: MFU is then null, never a guess.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peak:
    """Datasheet peaks (dense, no sparsity) and, where measured on our machines, the achievable ceilings."""

    tflops: dict  # precision (bf16, fp16, fp32) -> dense TFLOP/s
    hbm_gbs: float | None = None  # memory bandwidth, GB/s (1e9 bytes/s)
    l2_mb: float | None = None  # L2 cache, MB
    measured_gbs: float | None = None  # device-to-device copy, bytes read + written
    measured_tflops: dict | None = None  # large random matmul


# First match wins: every fragment of an entry must occur in the device name, and none of its
# exclusions ("H200" must not match a GH200), so the more specific names come first.
# Sources: vendor datasheets; measured ceilings from our own H200 runs (bench/README.md).
_TABLE: list[tuple[tuple[str, ...], tuple[str, ...], Peak]] = [
    (("H100", "PCIe"), (), Peak({"bf16": 756, "fp16": 756, "fp32": 51}, 2000, 50)),
    (("H100", "NVL"), (), Peak({"bf16": 835, "fp16": 835, "fp32": 60}, 3900, 50)),
    (("H100",), (), Peak({"bf16": 989, "fp16": 989, "fp32": 67}, 3350, 50)),  # SXM (HBM3)
    (("H200", "NVL"), ("GH200",), Peak({"bf16": 835, "fp16": 835, "fp32": 60}, 4800, 50)),
    (
        ("H200",),
        ("GH200",),
        Peak({"bf16": 989, "fp16": 989, "fp32": 67}, 4800, 60, measured_gbs=4300, measured_tflops={"bf16": 790}),
    ),
    (("GH200",), (), Peak({"bf16": 989, "fp16": 989, "fp32": 67}, 4000, 60)),
    (("B200",), (), Peak({"bf16": 2250, "fp16": 2250, "fp32": 75}, 8000, 126)),
    (("A100", "80GB", "PCIe"), (), Peak({"bf16": 312, "fp16": 312, "fp32": 19.5}, 1935, 40)),
    (("A100", "80GB"), (), Peak({"bf16": 312, "fp16": 312, "fp32": 19.5}, 2039, 40)),
    (("A100",), (), Peak({"bf16": 312, "fp16": 312, "fp32": 19.5}, 1555, 40)),  # 40 GB
    (("L40S",), (), Peak({"bf16": 362, "fp16": 362, "fp32": 91.6}, 864, 96)),
    (("A10G",), (), Peak({"bf16": 70, "fp16": 70, "fp32": 31.2}, 600, 6)),
    (("L4",), (), Peak({"bf16": 121, "fp16": 121, "fp32": 30.3}, 300, 48)),
    (("V100",), (), Peak({"fp16": 125, "fp32": 15.7}, 900, 6)),
]


def peak_for(name: str | None) -> Peak | None:
    """The table entry for a device name (torch.cuda.get_device_name), None for the CPU or an unknown GPU."""
    if not name:
        return None
    low = name.lower()
    for fragments, exclusions, peak in _TABLE:
        if all(f.lower() in low for f in fragments) and not any(x.lower() in low for x in exclusions):
            return peak
    return None


def peak_flops(name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of a device for a precision (fp32 | bf16 | fp16), or None when unknown."""
    peak = peak_for(name)
    tflops = None if peak is None else peak.tflops.get(precision)
    return None if tflops is None else tflops * 1e12


def gpu_name(device: torch.device) -> str | None:
    """torch.cuda.get_device_name on a CUDA device, None elsewhere (the peak table's key)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@functools.cache
def _processor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H200' on a GPU; 'cpu: <processor> (<n> threads)' on the CPU, where timings depend on both."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_processor()} ({torch.get_num_threads()} threads)"
