"""GSSM: graph-structured sequential models, hidden Markov chains on a DAG whose observed node emits tokens.

`GSSMConfig` describes the graph; `GSSM(config, seed)` draws its transition kernels and samples
token sequences (a compiled sampler from csrc/ when built, a numpy reference otherwise). The exact
likelihood (equivalent HMM, Bayes-optimal NLL) lives in nanollama/data/gssm/hmm.py.

Semantics: every hidden node starts in state 0; at each step the nodes are sampled in topological
order, a hidden node from its own previous state and its parents' new states, the observed node from
its parents' new states only; tokens x_1..x_T are the observed node's states at steps 1..T.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from nanollama.data.gssm import hmm as hmm_lib
from nanollama.data.gssm.config import GSSMConfig
from nanollama.utils.checks import check_int

# ----------------------------------------------------------------------------- the model

# Kernel entries are floored so that a product of rows never underflows to an all-zero row and every
# transition has a finite log-likelihood; with rows of at most a few hundred states the floor moves
# less than 1e-9 of probability mass.
FLOOR = 1e-12
# A node whose joint-input table (rows x states) is at most this large is sampled from a precomputed
# cumulative table; a larger product node multiplies its factor rows at every step instead.
TABLE_LIMIT = 1 << 22

_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK = (1 << 64) - 1

log = logging.getLogger(__name__)


@dataclass
class Node:
    """A validated node in topological position: where its inputs live and what it draws from."""

    name: str
    dim: int
    alpha: float
    mode: str
    kernel_type: str
    observed: bool
    inputs: list[int]  # topological positions of the inputs: own previous state first (hidden nodes), then parents
    prev: list[bool]  # whether each input is read at the previous step (only a hidden node's own state)

    @property
    def context(self) -> bool:
        return self.mode == "context"


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic), the same as csrc/gssm_sampler.cpp."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def _check_seed(seed: int, name: str = "seed") -> int:
    return check_int(name, seed, 0)


class GSSM:
    """A GSSM with its kernels drawn from `seed`: the same seed gives the same graph on every rank.

    Randomness is counter-based: the uniform that drives node j at step t of sequence b is a hash of
    (graph seed, sample seed, b, t, j). So sequence b of `sample(B, T, seed)` does not depend on B,
    its first T' tokens are those of `sample(B, T', seed)`, and the numpy and C++ samplers agree
    token for token. In context mode, sequence b's kernels come from the generator seeded with
    (graph seed, sample seed, b), which `nll` replays.
    """

    def __init__(self, config: GSSMConfig, seed: int = 0):
        if not isinstance(config, GSSMConfig):
            raise TypeError(f"config must be a GSSMConfig, got {type(config).__name__}")
        self.config, self.seed = config, _check_seed(seed)
        self.backend = "auto"  # "auto" | "cpp" | "numpy": which sampler `sample` uses by default
        order = config.order  # validates the graph
        pos = {n.name: i for i, n in enumerate(order)}
        self.nodes: list[Node] = []
        for i, n in enumerate(order):
            own = [] if n.observed else [i]
            self.nodes.append(
                Node(
                    n.name,
                    n.state_dim,
                    n.alpha,
                    n.mode,
                    n.kernel_type,
                    n.observed,
                    own + [pos[p] for p in n.parents],
                    [True] * len(own) + [False] * len(n.parents),
                )
            )
        # hidden nodes in config order: the layout of `return_hidden` and of the joint state in hmm()
        self.hidden = [pos[n.name] for n in config.nodes if not n.observed]
        self.observed = pos[config.observed.name]
        rng = np.random.default_rng(self.seed)
        self.kernels = [None if n.context else self._draw(rng, n) for n in self.nodes]
        self._forward: dict = {}  # (device, dtype) -> hmm_lib.Forward for a fixed graph
        self._plan_fixed = [
            None if k is None else self._sampler_tables(n, [k]) for n, k in zip(self.nodes, self.kernels)
        ]

    # --------------------------------------------------------------------- kernels

    @property
    def vocab_size(self) -> int:
        return self.nodes[self.observed].dim

    @property
    def hidden_names(self) -> list[str]:
        return [self.nodes[i].name for i in self.hidden]

    @property
    def context(self) -> bool:
        return any(n.context for n in self.nodes)

    def input_dims(self, node: Node) -> list[int]:
        return [self.nodes[i].dim for i in node.inputs]

    def _draw(self, rng: np.random.Generator, node: Node) -> list[np.ndarray]:
        """The node's kernel matrices: one (d_in, d) per input (product) or one (prod d_in, d) (fullrank)."""
        dims = self.input_dims(node)
        rows = [int(np.prod(dims))] if node.kernel_type == "fullrank" or not dims else dims
        mats = []
        for r in rows:
            m = rng.dirichlet(np.full(node.dim, node.alpha), size=r)
            m = np.maximum(m, FLOOR)
            m /= m.sum(1, keepdims=True)
            if node.mode in ("slow", "dead"):
                # swap each row's largest probability onto the diagonal (sticky) or onto state 0
                idx = np.arange(r)
                top = m.argmax(1)
                target = idx if node.mode == "slow" else np.zeros(r, dtype=np.int64)
                a, b = m[idx, top].copy(), m[idx, target].copy()
                m[idx, top], m[idx, target] = b, a
            mats.append(m)
        return mats

    def sequence_kernels(self, seed: int, index: int) -> list[list[np.ndarray] | None]:
        """Kernels of sequence `index` of `sample(..., seed)`: the fixed ones, and the context ones redrawn."""
        rng = np.random.default_rng([self.seed, _check_seed(seed), _check_seed(index, "index")])
        return [self._draw(rng, n) if n.context else k for n, k in zip(self.nodes, self.kernels)]

    @staticmethod
    def weights(node: Node, mats: list[np.ndarray]) -> np.ndarray:
        """Unnormalised next-state weights per joint input, (prod d_in, d), inputs in C order.

        A product node's row is the elementwise product of its factor rows, multiplied left to right
        as the samplers do at run time, so table and run-time sampling give the same bits.
        """
        w = mats[0]
        for m in mats[1:]:
            w = (w[:, None, :] * m[None, :, :]).reshape(-1, node.dim)
        return w

    def _sampler_tables(self, node: Node, per_seq: list[list[np.ndarray]]) -> tuple[str, list[np.ndarray]]:
        """What the samplers read for a node: ("table", [cum]) or ("factors", mats), each with a leading
        batch axis of 1 (fixed kernels) or B (context kernels)."""
        mats = per_seq[0]
        rows = int(np.prod([m.shape[0] for m in mats]))
        if len(mats) == 1 or rows * node.dim * len(per_seq) <= TABLE_LIMIT:
            cum = np.stack([np.cumsum(self.weights(node, ms), axis=1) for ms in per_seq])
            return "table", [np.ascontiguousarray(cum)]
        return "factors", [np.ascontiguousarray(np.stack([ms[k] for ms in per_seq])) for k in range(len(mats))]

    def _plan(self, batch_size: int, seed: int, first: int) -> list[tuple[str, list[np.ndarray]]]:
        if not self.context:
            return self._plan_fixed
        seqs = [self.sequence_kernels(seed, first + b) for b in range(batch_size)]
        return [
            self._sampler_tables(n, [s[j] for s in seqs]) if n.context else self._plan_fixed[j]
            for j, n in enumerate(self.nodes)
        ]

    # --------------------------------------------------------------------- sampling

    def _key(self, seed: int, first: int) -> int:
        """The samplers' key: sequence b of the call hashes key + (b + 1) * golden, so shifting the key
        by `first` golden steps makes row b sequence first + b of the seed's stream."""
        key = int(np.random.SeedSequence([self.seed, _check_seed(seed)]).generate_state(1, np.uint64)[0])
        return (key + _check_seed(first, "first") * _GOLDEN) & _MASK

    def sample(
        self,
        batch_size: int,
        seq_len: int,
        seed: int,
        return_hidden: bool = False,
        backend: str | None = None,
        threads: int | None = None,
        first: int = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T) int64, and with `return_hidden` the hidden states (B, T, n_hidden) in config order.

        Row b is sequence `first + b` of the stream `seed` names: the same sequence whatever B, T
        (its first T tokens) and `first` it is asked for with, so a resumable loader can keep one
        seed and advance `first`.

        `backend`: "auto" (the compiled sampler when built, else numpy with a warning), "cpp" or
        "numpy"; defaults to `self.backend`. `threads`: the C++ sampler's threads (default: the
        usable cores); the result does not depend on it.
        """
        check_int("batch_size", batch_size, 1)
        check_int("seq_len", seq_len, 1)
        backend = backend or self.backend
        if backend not in ("auto", "cpp", "numpy"):
            raise ValueError(f"backend must be auto, cpp or numpy, got {backend!r}")
        plan, key = self._plan(batch_size, seed, first), self._key(seed, first)
        ext = _extension() if backend != "numpy" else None
        if backend == "cpp" and ext is None:
            raise RuntimeError("backend='cpp' but nanollama._gssm_sampler is not built (run `make install`)")
        if ext is not None:
            threads = threads or _usable_cores()
            states = np.empty((batch_size, seq_len, len(self.nodes)), dtype=np.int64)
            ext.sample(
                [(n.dim, n.inputs, n.prev, kind, arrays) for n, (kind, arrays) in zip(self.nodes, plan)],
                key,
                states,
                int(threads or 1),
            )
        else:
            states = self._sample_numpy(plan, key, batch_size, seq_len)
        tokens = torch.from_numpy(np.ascontiguousarray(states[:, :, self.observed]))
        if not return_hidden:
            return tokens
        return tokens, torch.from_numpy(np.ascontiguousarray(states[:, :, self.hidden]))

    # --------------------------------------------------------------------- exact likelihood

    def hmm(self, max_states: int = hmm_lib.MAX_DENSE_STATES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The equivalent HMM over the joint hidden state (hidden nodes in config order, mixed radix):
        pi (S,) the law of the state that emits x_1, T (S, S) the transition matrix, E (S, V) the
        emission matrix, all float64. Refuses context graphs and joint spaces over `max_states`."""
        if self.context:
            raise ValueError("hmm(): a context graph redraws its kernels per sequence, so it has no single HMM")
        return hmm_lib.joint_hmm(self, self.kernels, max_states)

    def nll(
        self,
        tokens: torch.Tensor,
        seed: int | None = None,
        dtype: torch.dtype = torch.float64,
        backend: str = "auto",
        threads: int | None = None,
        first: int = 0,
    ) -> torch.Tensor:
        """Bayes-optimal -log p(x_t | x_<t) under the true model for tokens (B, T), as (B, T) on their device.

        A context graph needs the `seed` (and `first`) that `sample` was given: row b is scored with
        the kernels of sequence first + b of that stream (the oracle that knows each sequence's kernels). `backend`:
        "auto" (the compiled forward for float64 CPU tokens when built, else torch), "cpp" or "torch".
        """
        self._check_tokens(tokens)
        if backend not in ("auto", "cpp", "torch"):
            raise ValueError(f"backend must be auto, cpp or torch, got {backend!r}")
        on_cpu64 = tokens.device.type == "cpu" and dtype == torch.float64
        ext = _extension() if backend != "torch" and on_cpu64 else None
        if backend == "cpp" and ext is None:
            raise RuntimeError("backend='cpp' needs float64 CPU tokens and a built nanollama._gssm_sampler")
        tokens = tokens.long()
        if self.context and seed is None:
            raise ValueError("nll(): a context graph needs the seed its tokens were sampled with")
        forward = hmm_lib.forward_for(self, tokens, seed, first, dtype)
        if ext is not None:
            return forward.nll_compiled(ext, tokens, threads or _usable_cores())
        return forward.nll(tokens)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (B, T) tensor, got {getattr(tokens, 'shape', type(tokens))}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            lo, hi = int(tokens.min()), int(tokens.max())
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{lo}, {hi}]")

    def posterior(
        self,
        tokens: torch.Tensor,
        seed: int | None = None,
        first: int = 0,
        joint: bool | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> hmm_lib.Posterior:
        """The exact filtered belief p(z_t | x_<=t) for tokens (B, T): a Posterior with `joint` (B, T,
        n_joint) over the joint hidden state in hmm()'s layout (config order, mixed radix), and
        `marginals`, name -> (B, T, state_dim), per hidden node; float64 on the tokens' device.

        The same factorised forward pass as `nll` (its torch path), so a context graph needs the
        `seed` and `first` that `sample` was given. `joint`: None keeps the joint belief when it has
        at most hmm_lib.MAX_POSTERIOR_STATES states (else only the marginals); True demands it (a
        ValueError naming the size beyond that limit); False skips it.
        """
        self._check_tokens(tokens)
        if not self.hidden:
            raise ValueError("posterior(): the graph has no hidden node")
        if self.context and seed is None:
            raise ValueError("posterior(): a context graph needs the seed its tokens were sampled with")
        dims = [self.nodes[j].dim for j in self.hidden]
        n_joint = int(np.prod(dims))
        if joint and n_joint > hmm_lib.MAX_POSTERIOR_STATES:
            raise ValueError(
                f"posterior(): the joint hidden state has {n_joint} states (dims {dims}), over the limit of "
                f"{hmm_lib.MAX_POSTERIOR_STATES}; ask for joint=False to get the per-node marginals"
            )
        keep = n_joint <= hmm_lib.MAX_POSTERIOR_STATES if joint is None else joint
        tokens = tokens.long()
        forward = hmm_lib.forward_for(self, tokens, seed, first, dtype)
        full, marginals = forward.posterior(tokens, keep)
        topo = sorted(self.hidden)  # the forward pass lays hidden axes out in topological order
        perm = [topo.index(j) for j in self.hidden]
        if full is not None:  # (B, T, topological axes) -> (B, T, config-order axes), flattened again
            B, T = tokens.shape
            topo_dims = [self.nodes[j].dim for j in topo]
            full = full.reshape(B, T, *topo_dims).permute(0, 1, *[2 + k for k in perm]).reshape(B, T, n_joint)
        names = self.hidden_names
        return hmm_lib.Posterior(full, {names[i]: marginals[perm[i]] for i in range(len(names))}, dims)

    def entropy_rate(self, n_seqs: int = 256, seq_len: int = 256, seed: int = 2**31 - 1) -> tuple[float, float]:
        """Estimate of the entropy rate in nats/token, with its standard error.

        Samples `n_seqs` sequences and averages the Bayes-optimal NLL over the second half of each,
        where the belief has forgotten the fixed start state; the error is the standard deviation
        of the per-sequence means over sqrt(n_seqs). (A finite-context average upper-bounds the
        rate and converges to it as seq_len grows.)
        """
        if n_seqs < 2 or seq_len < 2:
            raise ValueError(f"entropy_rate needs n_seqs >= 2 and seq_len >= 2, got {n_seqs}, {seq_len}")
        tokens = self.sample(n_seqs, seq_len, seed)
        per_seq = self.nll(tokens, seed=seed)[:, seq_len // 2 :].mean(1)
        return float(per_seq.mean()), float(per_seq.std() / n_seqs**0.5)

    def _sample_numpy(self, plan, key: int, batch_size: int, seq_len: int) -> np.ndarray:
        """The reference sampler, vectorised over the batch: states (B, T, n_nodes) in topological order."""
        n_nodes = len(self.nodes)
        seq_key = _mix(np.uint64(key) + (np.arange(1, batch_size + 1, dtype=np.uint64) * np.uint64(_GOLDEN)))
        states = np.zeros((batch_size, seq_len, n_nodes), dtype=np.int64)
        prev = np.zeros((n_nodes, batch_size), dtype=np.int64)  # every hidden node starts in state 0
        cur = np.zeros_like(prev)
        rows_b = np.arange(batch_size)
        for t in range(seq_len):
            for j, (node, (kind, arrays)) in enumerate(zip(self.nodes, plan)):
                ins = [prev[i] if p else cur[i] for i, p in zip(node.inputs, node.prev)]
                if kind == "table":
                    cum = arrays[0]
                    row = np.zeros(batch_size, dtype=np.int64)
                    for i, s in zip(node.inputs, ins):
                        row = row * self.nodes[i].dim + s
                    c = cum[0, row] if cum.shape[0] == 1 else cum[rows_b, row]
                else:
                    w = None
                    for f, s in zip(arrays, ins):
                        r = f[0, s] if f.shape[0] == 1 else f[rows_b, s]
                        w = r if w is None else w * r
                    c = np.cumsum(w, axis=1)
                ctr = np.uint64(((t * n_nodes + j + 1) * _GOLDEN) & _MASK)
                u = (_mix(seq_key + ctr) >> np.uint64(11)).astype(np.float64) * 2.0**-53
                v = u * c[:, -1]
                cur[j] = np.minimum((c <= v[:, None]).sum(1), node.dim - 1)
            states[:, t] = cur.T
            prev, cur = cur, prev
        return states


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def _extension():
    """The compiled sampler, or None (warned once) where it was not built."""
    try:
        return importlib.import_module("nanollama._gssm_sampler")
    except ImportError as e:
        log.warning("nanollama._gssm_sampler is not built (%s): GSSM sampling falls back to the slow numpy sampler", e)
        return None
