"""FLOP accounting for MFU and HFU: model FLOPs per token and what activation checkpointing adds.

MFU = achieved model FLOP/s / peak; HFU counts what the hardware really executes, including the
forward passes that activation checkpointing repeats. Model FLOPs per token come from the model's
spec (the Transformer follows the nanoGPT / torchtitan convention, 6N + 12 * L * H * Q * T).
"""

from __future__ import annotations

import torch

from nanollama.models import spec_of
from nanollama.utils.devices import peak_flops

__all__ = ["peak_flops", "per_token"]


def per_token(model: torch.nn.Module, seq_len: int, checkpointing: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per training token at context `seq_len`.

    full checkpointing runs every block's forward twice; selective recomputes only non-matmul ops,
    negligible in FLOPs, so it adds nothing.
    """
    spec = spec_of(model)
    model_flops = spec.flops_per_token(model, seq_len)
    extra = spec.recompute_flops_per_token(model, seq_len) if checkpointing == "full" else 0.0
    return model_flops, model_flops + extra
