"""FSDP2 sharding with mixed precision, and deterministic weights on any number of ranks.

The model knows nothing of torch.distributed: its spec (nanollama.models) names the blocks to shard
and gives each parameter's initial value; a spec may bring its own plan (`parallelize`).
"""

from __future__ import annotations

import torch

from nanollama.distributed import tensor_parallel
from nanollama.models import spec_of
from nanollama.utils.checks import ConfigError


def shard(
    model: torch.nn.Module, mesh, precision: str, reduce_dtype: str = "fp32", sequence_parallel: bool = False
) -> None:
    """FSDP2 on each block, then the root. bf16 parameters and compute with fp32 (or bf16) reduction.

    On a 2-D ("dp", "tp") mesh the model's tensor-parallel plan comes first, then FSDP2 over "dp".
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise ConfigError("precision", "fp16 is not supported under FSDP (use bf16, which needs no loss scaling)")
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        reduce = torch.float32 if reduce_dtype == "fp32" else torch.bfloat16
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    if mesh.ndim == 2:
        tensor_parallel.apply(model, mesh["tp"], sequence_parallel)
        mesh = mesh["dp"]
    spec = spec_of(model)
    if spec.parallelize is not None:
        spec.parallelize(model, mesh, policy)
        return
    for block in spec.blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Fill (possibly sharded) parameters with the model's deterministic initial values.

    Each parameter's full value comes from the spec's `initial_value(model, name, seed)` (seeded per parameter), and
    a sharded parameter keeps its own shard of it: the same weights whatever the world size, which
    is what makes 1-rank and 2-rank runs comparable.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    spec = spec_of(model)
    orders = tensor_parallel.row_orders(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = spec.initial_value(model, name, seed)
            if name in orders:  # rows the tensor-parallel plan reordered
                full = full[orders[name]]
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements))
            else:
                p.copy_(full)
