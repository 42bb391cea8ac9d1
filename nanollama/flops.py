"""FLOP accounting: model FLOPs per token, recompute FLOPs, and the peak FLOP/s of known devices.

MFU = achieved model FLOP/s / peak; HFU counts what the hardware really executes, including the
forward passes that activation checkpointing repeats. Model FLOPs per token follow the nanoGPT /
torchtitan convention, 6N + 12 * L * H * Q * T (see Transformer.flops_per_token).
"""

from __future__ import annotations

import torch

# Dense (no sparsity) peak TFLOP/s by device-name fragment, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of a device for a precision (fp32 | bf16 | fp16), or None when unknown: never a guess."""
    if not device_name:
        return None
    # "H200" must not match "GH200" and "H100" must not swallow "H100 PCIe": the table lists specific names first.
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in device_name and (fragment != "H200" or "GH200" not in device_name):
            tflops = peaks.get(precision)
            return tflops * 1e12 if tflops is not None else None
    return None


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def recompute_flops_per_token(model, seq_len: int, checkpointing: str) -> float:
    """Extra FLOPs per token that activation checkpointing spends re-running forward passes.

    full: every block's forward runs twice, 2 * N_blocks + 4 * L * H * Q * T more (forward matmuls
    and attention). selective: only non-matmul ops are recomputed, negligible in FLOPs: 0.
    """
    if checkpointing != "full":
        return 0.0
    c = model.config
    block_params = sum(p.numel() for p in model.layers.parameters())
    return 2.0 * block_params + 4.0 * c.n_layers * c.n_heads * c.head_dim * seq_len
