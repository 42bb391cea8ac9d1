"""The model plug point: `model.arch` -> ModelSpec, everything the trainer, FSDP and generation need.

A new model family is new files plus one `register(ModelSpec(...))` line; nothing else names it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nanollama.utils.checks import ConfigError
from nanollama.utils.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """What one architecture provides. Every callable takes the built model first.

    config: the `model` section's dataclass; it has an `arch` field (this spec's name) and `vocab_size`.
    build: config -> module (under `torch.device("meta")` when the trainer shards it).
    blocks: the repeated units, in order: each is FSDP-sharded, activation-checkpointed and compiled alone.
    initial_value: (model, parameter name, seed) -> its full initial tensor on the CPU, a function of
        (seed, name) alone, so the weights are the same on any world size.
    num_params: (model, embeddings) -> parameter count; embeddings=False leaves out the token embedding table.
    reset_buffers: recompute non-persistent buffers (e.g. RoPE tables) after `to_empty` on a device.
    flops_per_token: (model, seq_len) -> model FLOPs of one training token (forward + backward), for MFU.
    recompute_flops_per_token: (model, seq_len) -> extra FLOPs per token when every block's forward
        runs twice (full activation checkpointing), for HFU.
    parallelize: (model, mesh, mp_policy) -> None, the model's own sharding plan; None: FSDP2 on each
        block, then the root.
    new_state: (model, batch_size, max_len) -> a generation state on the model's device and dtype (see
        models/transformer/cache.py for the interface); None: no cached generation.
    tensor_parallel: the model's tensor-parallel plan (TensorParallelPlan); None: parallel.tp must be 1.
    """

    arch: str
    config: type
    build: Callable[[Any], nn.Module]
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    initial_value: Callable[[nn.Module, str, int], torch.Tensor]
    flops_per_token: Callable[[nn.Module, int], float]
    recompute_flops_per_token: Callable[[nn.Module, int], float]
    num_params: Callable[[nn.Module, bool], int] = lambda model, embeddings=True: sum(
        p.numel() for p in model.parameters()
    )
    reset_buffers: Callable[[nn.Module], None] = lambda model: None
    parallelize: Callable[..., None] | None = None
    new_state: Callable[..., Any] | None = None
    tensor_parallel: TensorParallelPlan | None = None


@dataclass(frozen=True)
class TensorParallelPlan:
    """How an architecture splits over a tensor-parallel mesh dimension (torch.distributed.tensor.parallel).

    check: (model config, tp) -> None, or a ConfigError naming the fields that do not divide by tp.
    apply: (model on the meta device, 1-D "tp" DeviceMesh, sequence_parallel) -> None, in place, before
        FSDP2 shards over "dp". It may set `model.tp_row_order = {parameter name: LongTensor}`: rows of a
        parameter whose layout under TP differs from its checkpoint layout (param_tp = param_ckpt[order]),
        so checkpoints stay in one layout whatever the mesh.
    """

    check: Callable[[Any, int], None]
    apply: Callable[[nn.Module, Any, bool], None]


SPECS: Registry[ModelSpec] = Registry("architecture", default="transformer")


def register(spec: ModelSpec) -> ModelSpec:
    """Make `spec` selectable as `model.arch=<spec.arch>`; re-registering a name replaces it."""
    return SPECS.add(spec.arch, spec)


def archs() -> list[str]:
    return SPECS.names()


def get(arch: str) -> ModelSpec:
    """The spec of `arch`; a ValueError naming the known architectures otherwise."""
    return SPECS.get(arch)


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec a built model belongs to (by its config's `arch`)."""
    return get(model.config.arch)


def config_class(arch: str) -> type:
    return get(arch).config


def default_config() -> Any:
    """The `model` section of a config that names no architecture."""
    return config_class(SPECS.default)()


def check_tensor_parallel(cfg: Any, tp: int) -> None:
    """A ConfigError unless model config `cfg` can run with tensor-parallel degree `tp`."""
    if tp == 1:
        return
    plan = get(cfg.arch).tensor_parallel
    if plan is None:
        raise ConfigError(
            "parallel.tp", f"model.arch={cfg.arch} has no tensor-parallel plan (ModelSpec.tensor_parallel): use tp=1"
        )
    plan.check(cfg, tp)


def build(cfg: Any) -> nn.Module:
    """The model for a `model` config section, initialised with seed 0 unless on the meta device."""
    return get(cfg.arch).build(cfg)


def reset_parameters(model: nn.Module, seed: int = 0) -> None:
    """Set every (unsharded, materialised) parameter to the spec's initial value for `seed`."""
    spec = spec_of(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(spec.initial_value(model, name, seed))


def seeded_normal(shape: torch.Size, std: float, seed: int, index: int) -> torch.Tensor:
    """Normal(0, std) from a generator seeded by (seed, index): per-parameter seeding for `initial_value`."""
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    return torch.empty(shape).normal_(0.0, std, generator=generator)
