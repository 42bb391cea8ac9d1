"""Trading compute for memory and host time per block: activation checkpointing and torch.compile."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from nanollama.models import spec_of

# Ops whose outputs selective checkpointing keeps; everything else (norms, activations, rotations)
# is recomputed in the backward pass. Matmuls are the expensive part to redo.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward: `full` all of them, `selective` all but matmuls."""
    if mode == "none":
        return
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    for block in spec_of(model).blocks(model):
        forward = block.forward
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _policy)
        # An instance attribute, not a wrapper module, so parameter names (and checkpoints) are unchanged.
        block.forward = functools.partial(checkpoint, forward, **kwargs)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each block (one graph reused by every layer: the blocks share code and shapes)."""
    for block in spec_of(model).blocks(model):
        block.compile()
