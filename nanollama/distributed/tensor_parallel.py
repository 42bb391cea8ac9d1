"""Tensor (and sequence) parallelism around a model's own plan: applying it, the loss, the gradient
norm over a 2-D ("dp", "tp") mesh, and checkpoints that keep one layout whatever the mesh.

The plan itself belongs to the model (ModelSpec.tensor_parallel, e.g. models/transformer/parallelize.py);
FSDP2 then shards over "dp" on top (fsdp.shard). See docs/parallel.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch

from nanollama.models import spec_of
from nanollama.utils.checks import ConfigError

# DTensor warns on every redistribution over both mesh dimensions (the gradient norm, a checkpoint's
# full tensors) that one flattened collective would be faster: true, and not worth a line per step.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def apply(model: torch.nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """The model's tensor-parallel plan over the 1-D `tp_mesh` (a ConfigError when its arch has none)."""
    plan = spec_of(model).tensor_parallel
    if plan is None:
        raise ConfigError(
            "parallel.tp", f"model.arch={model.config.arch} has no tensor-parallel plan (ModelSpec.tensor_parallel)"
        )
    plan.apply(model, tp_mesh, sequence_parallel)


def row_orders(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters whose rows the plan reordered (param_tp = param_checkpoint[order]); empty without TP."""
    return getattr(model, "tp_row_order", {})


def loss_context(enabled: bool):
    """loss_parallel() when enabled: cross-entropy on vocabulary-sharded logits, forward and backward inside."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to the global gradient norm over every mesh dimension; returns the norm before clipping.

    torch.nn.utils.clip_grad_norm_ stacks the per-parameter norms, which fails when the parameters
    live on different meshes: under TP + FSDP2 the TP-sharded ones are DTensors on the 2-D mesh,
    the others (norm gains without sequence parallelism) on the 1-D "dp" mesh, replicated over "tp".
    So each mesh's group gets its own (exact, all-reduced) norm, and the groups combine in quadrature.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    total_sq = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total_sq += norm.item() ** 2
    total = math.sqrt(total_sq)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for grads in groups.values():
                for g in grads:
                    g.mul_(coef)
    return total


def _entries(state: dict, name: str) -> Iterator[tuple[dict, str]]:
    """(holder, key) of parameter `name`'s tensors in {"model": ..., "optimizer": ...} state dicts."""
    if name in state.get("model", {}):
        yield state["model"], name
    states = state.get("optimizer", {}).get("state", {})
    if name not in states:
        return
    # get_state_dict hands out the optimizer's own per-parameter dicts: replace entries in a copy only
    per_param = states[name] = dict(states[name])
    for key, value in per_param.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:  # exp_avg, exp_avg_sq (not `step`)
            yield per_param, key


def to_checkpoint_layout(model: torch.nn.Module, state: dict) -> None:
    """Replace reordered parameters (and their optimizer moments) in `state` by full tensors in checkpoint order.

    A plain tensor, the same on every rank: DCP writes it once, and any mesh (or none) reads it back.
    It costs one full copy of each such tensor per rank while saving.
    """
    for name, order in row_orders(model).items():
        for holder, key in _entries(state, name):
            value = holder[key]
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            holder[key] = full[torch.argsort(order).to(full.device)]


def from_checkpoint_layout(model: torch.nn.Module, state: dict) -> Callable[[], None]:
    """Before dcp.load: swap reordered DTensors in `state` for full tensors to load into.

    Returns what to call after the load: it reorders them and gives each rank its shard again.
    """
    from torch.distributed.tensor import distribute_tensor

    swaps = []
    for name, order in row_orders(model).items():
        for holder, key in _entries(state, name):
            dt = holder[key]
            holder[key] = torch.empty(dt.shape, dtype=dt.dtype, device=dt.device)
            swaps.append((holder, key, dt, order))

    def restore() -> None:
        for holder, key, dt, order in swaps:
            full = holder[key][order.to(holder[key].device)]
            # Every rank holds the full tensor: each keeps its shard, no communication (src_data_rank=None).
            holder[key] = distribute_tensor(full, dt.device_mesh, dt.placements, src_data_rank=None)

    return restore
