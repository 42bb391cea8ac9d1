"""What the probes are asked to recover on GSSM data: the true hidden states, their exact posterior, and
the split of sequences into fitting, validation and held-out (scored) rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nanollama.data.gssm.graph import GSSM

# A probe onto the joint hidden state is fitted only up to this many joint states (the cost of a
# softmax probe grows with its classes; per-node probes are always fitted).
JOINT_PROBE_MAX = 256
MIN_SEQUENCES = 8  # at least one sequence each for fitting, validation and scoring, and a few to spare
FRACTIONS = (0.6, 0.15)  # fitting and validation shares of the sequences; the rest are scored


class ProbeError(ValueError):
    """Input the probes cannot use (no hidden node, too few sequences): one line, exit code 2."""


@dataclass
class Targets:
    """Per target ("clock", ..., and "joint" when small enough): labels (B, S) int64 and the exact
    belief (B, S, K) float32 over its K states; sequences [0, n_fit) fit, [n_fit, n_train) validate,
    [n_train, B) are scored."""

    tokens: torch.Tensor
    labels: dict[str, torch.Tensor]
    beliefs: dict[str, torch.Tensor]
    n_fit: int
    n_train: int
    seed: int

    @property
    def names(self) -> list[str]:
        return list(self.labels)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A (B, S, ...) tensor as (fit, validation, scored) rows, each flattened over (sequence, position):
        the split is by sequence, so no scored position shares a sequence with a fitted one."""
        parts = t[: self.n_fit], t[self.n_fit : self.n_train], t[self.n_train :]
        return tuple(p.reshape(-1, *t.shape[2:]) for p in parts)


def split_sizes(n_sequences: int) -> tuple[int, int]:
    if n_sequences < MIN_SEQUENCES:
        raise ProbeError(
            f"--sequences {n_sequences} is too few for a fit / validation / held-out split by sequence "
            f"(at least {MIN_SEQUENCES})"
        )
    n_fit = max(1, int(n_sequences * FRACTIONS[0]))
    n_train = max(n_fit + 1, int(n_sequences * (FRACTIONS[0] + FRACTIONS[1])))
    return n_fit, min(n_train, n_sequences - 1)


def probe_targets(g: GSSM, n_sequences: int, seq_len: int, seed: int, device: torch.device | str = "cpu") -> Targets:
    """Sample `n_sequences` of `seq_len` tokens (stream `seed`) with their hidden states and exact posterior."""
    if not g.hidden:
        raise ProbeError("the GSSM graph has no hidden node: there is no hidden state to probe")
    n_fit, n_train = split_sizes(n_sequences)
    tokens, hidden = g.sample(n_sequences, seq_len, seed=seed, return_hidden=True)
    post = g.posterior(tokens, seed=seed)
    labels = {name: hidden[..., k] for k, name in enumerate(g.hidden_names)}
    beliefs = {name: post.marginals[name].float() for name in g.hidden_names}
    n_joint = int(np.prod(post.dims))
    if len(post.dims) > 1 and post.joint is not None and n_joint <= JOINT_PROBE_MAX:
        flat = np.ravel_multi_index(hidden.reshape(-1, len(post.dims)).T.numpy(), post.dims)
        labels["joint"] = torch.from_numpy(flat).view(n_sequences, seq_len)
        beliefs["joint"] = post.joint.float()
    device = torch.device(device)
    return Targets(
        tokens.to(device),
        {k: v.to(device) for k, v in labels.items()},
        {k: v.to(device) for k, v in beliefs.items()},
        n_fit,
        n_train,
        seed,
    )
