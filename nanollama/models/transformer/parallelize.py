"""The Transformer's tensor-parallel plan (Megatron-style), written with torch.distributed.tensor.parallel.

Per block: the fused qkv projection and w1 / w3 column-wise (each rank computes its own heads and its
own slice of the hidden units), wo and w2 row-wise (partial sums, all-reduced, or reduce-scattered
over the sequence with sequence parallelism). The token embedding and the output projection are
sharded over the vocabulary; the logits stay a DTensor sharded on the vocabulary, so that the loss
runs under `loss_parallel()` without ever gathering (B, S, vocab).

The fused qkv weight is laid out [q heads; k heads; v heads] (checkpoints keep that layout). A plain
column split of it would give rank 0 only q heads, so under TP its rows are reordered to
[q_0; k_0; v_0; q_1; k_1; v_1; ...] (rank r's q, k and v heads contiguous): the split then gives each
rank its own Hq/tp query and Hk/tp key/value heads, in the order GQA pairs them (query head h reads
kv head h // (Hq/Hk)), and the model's forward runs unchanged on the local head counts. The order is
published as `model.tp_row_order` so initialisation and checkpoints convert (distributed/tensor_parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn

from nanollama.models.transformer.model import TransformerConfig
from nanollama.utils.checks import ConfigError


def check(cfg: TransformerConfig, tp: int) -> None:
    """A ConfigError unless the heads, hidden units and tied weights allow tensor-parallel degree tp."""
    if cfg.n_heads % tp or cfg.n_kv_heads % tp:
        raise ConfigError(
            "model.n_kv_heads",
            f"n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads} must both be divisible by parallel.tp={tp}",
        )
    if cfg.hidden_dim % tp:
        raise ConfigError("model.hidden_dim", f"{cfg.hidden_dim} must be divisible by parallel.tp={tp}")
    if cfg.tie_embeddings:
        # The embedding is sharded row-wise and the output column-wise: two distributions of one tensor.
        raise ConfigError("model.tie_embeddings", f"is not supported with parallel.tp={tp} > 1 (set it to false)")


def qkv_row_order(cfg: TransformerConfig, tp: int) -> torch.Tensor:
    """Rows of the fused [q; k; v] weight in the TP layout: for each rank r, its q, k and v rows in turn."""
    D, Hq, Hk = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    q = torch.arange(Hq * D)
    k = Hq * D + torch.arange(Hk * D)
    v = (Hq + Hk) * D + torch.arange(Hk * D)
    parts = []
    for r in range(tp):  # chunks of whole heads: Hq and Hk are multiples of tp
        parts += [q.chunk(tp)[r], k.chunk(tp)[r], v.chunk(tp)[r]]
    return torch.cat(parts)


def apply(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Parallelise `model` (a Transformer, typically on the meta device) over the 1-D `tp_mesh`, in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    cfg, tp = model.config, tp_mesh.size()
    check(cfg, tp)
    # Between blocks the residual stream is replicated, or (sequence parallel) sharded on the sequence.
    residual = Shard(1) if sequence_parallel else Replicate()
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        # logits (B, S, vocab) sharded on the vocabulary: the loss-parallel cross-entropy reads them as they are
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        top["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)
    # The embedding's output is the local view of a DTensor (to_local); a compiled block fed that view
    # hands back no gradient to it (measured, torch 2.13: a zero embedding gradient). A copy of the
    # (B, S, dim) activations, once per forward, is the cheap way out.
    model.tok_embeddings.register_forward_hook(lambda module, args, out: out.clone())
    for block in model.layers:
        plan = {
            "attention.wqkv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            # Norms run on the local sequence shard; attention and the MLP all-gather it first.
            # Attention's inputs: (x, cos, sin, mask, positions, cache); only x is laid out.
            rest = (None,) * 5
            plan["attention_norm"] = SequenceParallel()
            plan["attention"] = PrepareModuleInput(
                input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest), use_local_output=True
            )
            plan["ffn_norm"] = SequenceParallel()
            plan["feed_forward"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )
        parallelize_module(block, tp_mesh, plan)
        # The forward reshapes by these counts: the local heads (RoPE, attention and decode kernels run on them).
        block.attention.n_heads = cfg.n_heads // tp
        block.attention.n_kv_heads = cfg.n_kv_heads // tp
    order = qkv_row_order(cfg, tp)
    model.tp_row_order = {f"layers.{i}.attention.wqkv.weight": order for i in range(cfg.n_layers)}
