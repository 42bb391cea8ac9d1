"""Exact likelihood of a GSSM: its equivalent HMM, and the Bayes-optimal NLL by a factorised forward pass.

The joint hidden state z = (s_1, ..., s_H) (hidden nodes in config order, mixed radix, C order) is
a Markov chain: P(z' | z) = prod_h K_h(s'_h | s_h, s'_parents(h)), and the token emitted at that
step has law K_o(x | s'_parents(o)). The forward pass keeps the predictive belief over z as a
tensor (B, d_1, ..., d_H) and moves it one node at a time, in topological order, by contracting
the node's old axis with its conditional table: a few small contractions per step instead of one
dense S x S product (S = prod d_h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# `g` is a GSSM and `node` one of its Nodes (graph.py), which imports this module for GSSM.hmm and
# GSSM.nll: annotated as Any so that the two modules do not import each other.
GSSM = Node = Any

# A dense transition matrix of 2^14 states is 2 GiB in float64; hmm() refuses beyond that.
MAX_DENSE_STATES = 1 << 14
# posterior() keeps the joint belief (B, T, n_joint) float64 up to this many states: 1,000 sequences
# of 64 positions are then at most 2 GiB; beyond it, the per-node marginals only.
MAX_POSTERIOR_STATES = 1 << 12


@dataclass
class Posterior:
    """Filtered beliefs p(z_t | x_<=t): `joint` (B, T, n_joint) in hmm()'s layout, or None when too big;
    `marginals` name -> (B, T, state_dim) per hidden node (config order); `dims` the hidden dims."""

    joint: torch.Tensor | None
    marginals: dict[str, torch.Tensor]
    dims: list[int]


def conditional_table(g: GSSM, node: Node, mats: list[np.ndarray]) -> np.ndarray:
    """The node's next-state law: (d_in_1, ..., d_in_k, d), normalised over the last axis."""
    w = g.weights(node, mats)
    w = w / w.sum(1, keepdims=True)
    return w.reshape([*g.input_dims(node), node.dim])


def _axes(g: GSSM, node: Node, new_offset: int) -> list[int]:
    """The joint-tensor axes of a node's inputs: own previous state at its old axis, parents at new ones."""
    where = {j: k for k, j in enumerate(g.hidden)}
    return [where[i] + (0 if prev else new_offset) for i, prev in zip(node.inputs, node.prev)]


def _place(table: np.ndarray, axes: list[int], n_axes: int) -> np.ndarray:
    """View `table`, whose axis i is joint axis axes[i], broadcastable over n_axes joint axes."""
    order = np.argsort(axes)
    shape = [1] * n_axes
    for i in order:
        shape[axes[i]] = table.shape[i]
    return table.transpose(order).reshape(shape)


def joint_hmm(
    g: GSSM, kernels: list[list[np.ndarray]], max_states: int = MAX_DENSE_STATES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pi, T, E) float64 over the joint hidden state, for one set of kernels (see GSSM.hmm)."""
    dims = [g.nodes[j].dim for j in g.hidden]
    n_states, n_hidden = int(np.prod(dims)), len(dims)
    if n_states > max_states:
        raise ValueError(
            f"the joint hidden state has {n_states} states (dims {dims}); a dense HMM is limited to {max_states}"
        )
    trans = np.ones(dims + dims)  # axes: old states, then new states
    for k, j in enumerate(g.hidden):
        node = g.nodes[j]
        table = conditional_table(g, node, kernels[j])
        trans *= _place(table, _axes(g, node, n_hidden) + [n_hidden + k], 2 * n_hidden)
    obs = g.nodes[g.observed]
    table = conditional_table(g, obs, kernels[g.observed])
    emit = np.broadcast_to(_place(table, _axes(g, obs, 0) + [n_hidden], n_hidden + 1), dims + [obs.dim])
    trans = trans.reshape(n_states, n_states)
    # every hidden node starts in state 0 (joint index 0); x_1 is emitted by the state after one step
    pi = trans[0].copy()
    return torch.from_numpy(pi), torch.from_numpy(trans), torch.from_numpy(emit.reshape(n_states, obs.dim).copy())


def tables(g: GSSM, kernel_sets: list[list[list[np.ndarray]]], device, dtype) -> list[torch.Tensor]:
    """Per node, its conditional table (Bk, d_in..., d): Bk = 1 when shared, else one per kernel set."""
    out = []
    for j, node in enumerate(g.nodes):
        sets = kernel_sets if node.context else kernel_sets[:1]
        t = np.stack([conditional_table(g, node, ks[j]) for ks in sets])
        out.append(torch.from_numpy(t).to(device=device, dtype=dtype))
    return out


def forward_for(g: GSSM, tokens: torch.Tensor, seed: int | None, first: int, dtype: torch.dtype) -> Forward:
    """The forward pass scoring `tokens`: cached per (device, dtype) for fixed kernels; for a context
    graph, built from the kernels of sequences first..first+B-1 of the stream `seed`."""
    if g.context:
        sets = [g.sequence_kernels(seed, first + b) for b in range(tokens.shape[0])]
        return Forward(g, tables(g, sets, tokens.device, dtype))
    key = (str(tokens.device), dtype)
    if key not in g._forward:
        g._forward[key] = Forward(g, tables(g, [g.kernels], tokens.device, dtype))
    return g._forward[key]


class Forward:
    """Batched scaled forward algorithm over a GSSM's factorised joint state.

    `tables[j]` is node j's conditional table as a tensor (Bk, d_in..., d) with Bk = 1 (shared by
    the batch) or B (one per sequence, context mode). The belief is laid out with the hidden axes
    in topological order, so a node's parents sit before it: viewed as (L, d, R), with L the states
    of the nodes before it and R those after it, moving the node is one batched matmul with a
    (L, d', d) matrix that reads its parents' states off L, and the result keeps the layout. Shared
    tables put the batch last (R >= B, few large matmuls); per-sequence tables put it first.
    """

    def __init__(self, g: GSSM, tables: list[torch.Tensor]):
        self.batched = any(t.shape[0] > 1 for t in tables)
        self.batch = max(t.shape[0] for t in tables)
        topo = [j for j, n in enumerate(g.nodes) if not n.observed]  # hidden nodes, topological order
        self.axis = {j: k for k, j in enumerate(topo)}
        self.dims = [g.nodes[j].dim for j in topo]
        self.moves = []  # per hidden node: (L, d, R, matrices (N, d', d)); N = L, or B * L when batched
        for k, j in enumerate(topo):
            node, t = g.nodes[j], tables[j]
            left = int(np.prod(self.dims[:k]))
            right = int(np.prod(self.dims[k + 1 :]))
            mat = t.movedim(1, -1)  # (Bk, parents..., d', d)
            index = self._parent_index(node, left)
            mat = mat[(slice(None), *index)] if index else mat[:, None].expand(-1, left, -1, -1)  # (Bk, L, d', d)
            mat = mat.expand(self.batch if self.batched else 1, *mat.shape[1:])
            self.moves.append((left, node.dim, right, mat.reshape(-1, node.dim, node.dim).contiguous()))
        # emission (Bk, V, hidden axes with 1 off the parents), gathered per token
        obs, t = g.nodes[g.observed], tables[g.observed]
        axes = [self.axis[i] for i in obs.inputs]
        order = sorted(range(len(axes)), key=lambda i: axes[i])
        shape = [1] * len(self.dims)
        for i in order:
            shape[axes[i]] = t.shape[1 + i]
        # the compiled forward's form: (Bk, V, P) over the parents' joint state, and each joint state's index in it
        n_par = int(np.prod(t.shape[1:-1]))
        self.emit_parents = t.reshape(t.shape[0], n_par, obs.dim).transpose(1, 2)
        states = np.indices(self.dims).reshape(len(self.dims), int(np.prod(self.dims)))
        parent_states = tuple(states[a] for a in axes)
        self.pidx = np.ravel_multi_index(parent_states, t.shape[1:-1]) if axes else np.zeros(states.shape[1], np.int64)
        emit = t.permute([0, len(axes) + 1] + [1 + i for i in order]).reshape(t.shape[0], obs.dim, *shape)
        if self.batched:  # (B, V, parent axes): row b gathers its token
            self.emit = emit.expand(self.batch, *emit.shape[1:]).contiguous()
        else:  # (parent states, V): a column gather gives the batch-last layout the belief has
            self.emit = emit[0].reshape(obs.dim, -1).T.contiguous()
        self.emit_shape = shape

    def _parent_index(self, node: Node, left: int) -> tuple[torch.Tensor, ...]:
        """For every joint state l of the nodes before `node`, its parents' states (one index per parent)."""
        k = self.axis[node.inputs[0]]
        states = np.indices(self.dims[:k]).reshape(k, left) if k else np.zeros((0, 1), dtype=np.int64)
        return tuple(torch.from_numpy(states[self.axis[i]]) for i in node.inputs[1:])

    def nll_compiled(self, ext, tokens: torch.Tensor, threads: int) -> torch.Tensor:
        """The same as `nll`, by the C++ forward (float64 CPU tables only): blocks of sequences spread
        over `threads` threads, no synchronisation between steps, no per-step dispatch overhead."""
        self._check_batch(tokens)
        moves = [(mat.numpy(), left, d, right, self.batched) for left, d, right, mat in self.moves]
        tokens = tokens.contiguous()
        out = torch.empty(tokens.shape, dtype=torch.float64)
        emit = np.ascontiguousarray(self.emit_parents.numpy())
        ext.forward(moves, emit, np.ascontiguousarray(self.pidx, dtype=np.int64), tokens.numpy(), out.numpy(), threads)
        return out

    def _check_batch(self, tokens: torch.Tensor) -> None:
        if self.batched and tokens.shape[0] != self.batch:
            raise ValueError(
                f"tokens have {tokens.shape[0]} rows but the per-sequence kernels were drawn for {self.batch}"
            )

    def nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """-log p(x_t | x_<t) for tokens (B, T): a (B, T) tensor in the tables' dtype."""
        B, T = tokens.shape
        self._check_batch(tokens)
        dtype, device, hidden = self.emit.dtype, self.emit.device, len(self.dims)
        shape = [B, *self.dims] if self.batched else [*self.dims, B]
        belief = torch.zeros(shape, dtype=dtype, device=device)
        if self.batched:
            belief.view(B, -1)[:, 0] = 1.0  # the start state: every hidden node in state 0
        else:
            belief.view(-1, B)[0] = 1.0
        out = torch.empty(T, B, dtype=dtype, device=device)
        rows = torch.arange(B, device=device)
        ones = torch.ones(1, int(np.prod(self.dims)), dtype=dtype, device=device)
        for t in range(T):
            for left, d, right, mat in self.moves:
                n, r = (B * left, right) if self.batched else (left, right * B)
                belief = torch.bmm(mat, belief.view(n, d, r)).view(shape)
            x = tokens[:, t]
            if self.batched:
                belief.mul_(self.emit[rows, x])  # (B, hidden axes)
                p = belief.view(B, -1).sum(1)
                belief.div_(p.view(B, *[1] * hidden))
            else:
                belief.mul_(self.emit.index_select(1, x).view(*self.emit_shape, B))  # (hidden axes, B)
                p = (ones @ belief.view(-1, B))[0]  # a matmul sums over the states faster than sum(0)
                belief.div_(p)
            out[t] = p  # p(x_t | x_<t)
        return -out.log().T

    def posterior(self, tokens: torch.Tensor, joint: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The filtered belief p(z_t | x_<=t) for tokens (B, T), by the same recursion as `nll`.

        Returns the joint belief (B, T, prod dims) with the hidden axes in topological order (C order),
        or None without `joint`, and each hidden node's marginal (B, T, d), in topological order.
        """
        B, T = tokens.shape
        self._check_batch(tokens)
        dtype, device, hidden = self.emit.dtype, self.emit.device, len(self.dims)
        n_states = int(np.prod(self.dims))
        shape = [B, *self.dims] if self.batched else [*self.dims, B]
        belief = torch.zeros(shape, dtype=dtype, device=device)
        if self.batched:
            belief.view(B, -1)[:, 0] = 1.0
        else:
            belief.view(-1, B)[0] = 1.0
        full = torch.empty(T, B, n_states, dtype=dtype, device=device) if joint else None
        marginals = [torch.empty(T, B, d, dtype=dtype, device=device) for d in self.dims]
        rows = torch.arange(B, device=device)
        for t in range(T):
            for left, d, right, mat in self.moves:
                n, r = (B * left, right) if self.batched else (left, right * B)
                belief = torch.bmm(mat, belief.view(n, d, r)).view(shape)  # predictive p(z_t | x_<t)
            x = tokens[:, t]
            if self.batched:
                belief.mul_(self.emit[rows, x])
                belief.div_(belief.view(B, -1).sum(1).view(B, *[1] * hidden))  # filtered p(z_t | x_<=t)
            else:
                belief.mul_(self.emit.index_select(1, x).view(*self.emit_shape, B))
                belief.div_(belief.view(-1, B).sum(0))
            as_batch_first = belief if self.batched else belief.movedim(hidden, 0)  # (B, hidden axes)
            if full is not None:
                full[t] = as_batch_first.reshape(B, n_states)
            for k in range(hidden):
                others = [a for a in range(1, hidden + 1) if a != k + 1]
                marginals[k][t] = as_batch_first.sum(others) if others else as_batch_first
        return (None if full is None else full.transpose(0, 1)), [m.transpose(0, 1) for m in marginals]
