"""Everything that knows torch.distributed: process groups (process.py), FSDP2 (fsdp.py), per-block
activation checkpointing and compile (blocks.py)."""

from nanollama.distributed.blocks import activation_checkpointing, compile_blocks
from nanollama.distributed.fsdp import init_weights, shard
from nanollama.distributed.process import Dist, init

__all__ = ["Dist", "activation_checkpointing", "compile_blocks", "init", "init_weights", "shard"]
