"""Shared pieces of the recurrent models (minGRU, minLSTM, Hawk, Mamba-2, hybrids): the config
fields, the LM skeleton, the causal conv / gated MLP / residual block and the generation state."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from nanollama.models.recurrent.config import RecurrentConfig
from nanollama.models.recurrent.layers import CausalConv1d, GatedMLP, ResidualBlock, StateSite
from nanollama.models.recurrent.model import RecurrentLM, seeded_uniform
from nanollama.models.recurrent.state import RecurrentState
from nanollama.models.registry import ModelSpec


def make_spec(arch: str, config: type, build: Callable[[object], nn.Module]) -> ModelSpec:
    """The ModelSpec of a RecurrentLM-based arch: everything but the config and the builder is shared."""
    return ModelSpec(
        arch=arch,
        config=config,
        build=build,
        blocks=lambda model: list(model.layers),
        initial_value=lambda model, name, seed: model.initial_value(name, seed),
        flops_per_token=lambda model, seq_len: model.flops_per_token(seq_len),
        recompute_flops_per_token=lambda model, seq_len: model.recompute_flops_per_token(seq_len),
        num_params=lambda model, embeddings=True: model.num_params(embeddings),
        reset_buffers=lambda model: model.reset_buffers(),
        new_state=lambda model, batch_size, max_len, dtype=None: RecurrentState(model, batch_size, max_len, dtype),
    )


__all__ = [
    "CausalConv1d",
    "GatedMLP",
    "RecurrentConfig",
    "RecurrentLM",
    "RecurrentState",
    "ResidualBlock",
    "StateSite",
    "make_spec",
    "seeded_uniform",
]
