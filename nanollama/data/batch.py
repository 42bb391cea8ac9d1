"""How a batch of token sequences is laid out for the training mask (`data.mask`).

- causal: each row is one sequence; every next token is scored.
- prefix_lm: each row gets a random prompt length p (1 <= p <= prefix_max * seq_len); the prompt is
  seen bidirectionally, so the targets inside it (visible to the model) are not scored: position i
  is scored iff i >= p - 1.
- document: each row packs several independent sequences (documents) of random lengths, each
  followed by an end token (id = the source's token vocabulary size); attention stays inside a
  document and positions restart at 0 in each. End tokens are not scored: a document's length is
  not part of the source (for a GSSM no Bayes-optimal loss exists for it).

Documents are prefixes of distinct source sequences. A GSSM sampler is prefix-stable (the first L
tokens of a sequence are a sequence of length L), so the Bayes-optimal NLL of every scored target
is the NLL of its own document, and `bayes` holds it target by target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanollama.kernels import masks

IGNORE = -100  # cross_entropy's ignore_index: targets that are not scored


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T), IGNORE where not scored
    mask: masks.Mask | None = None  # None: causal
    positions: torch.Tensor | None = None  # (B, T) RoPE positions, None: 0..T-1
    bayes: torch.Tensor | None = None  # (B, T) Bayes-optimal NLL of each target (0 where not scored)

    def to(self, device) -> Batch:
        """The tensors on `device` (a mask moves its own tensors where attention runs)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Batch(move(self.inputs), move(self.targets), self.mask, move(self.positions), move(self.bayes))


def rows_needed(kind: str, seq_len: int, doc_min: int) -> int:
    """Source sequences per packed row: `document` needs one per possible document."""
    return -(-(seq_len + 1) // (doc_min + 1)) if kind == "document" else 1


def lay_out(
    kind: str,
    source: torch.Tensor,
    generator: torch.Generator,
    *,
    prefix_max: float = 0.5,
    doc_min: int = 8,
    eos: int | None = None,
    nll: torch.Tensor | None = None,
) -> Batch:
    """A Batch from source tokens (B * rows_needed, T + 1) and, optionally, their NLL of the same shape.

    `generator` (a CPU torch.Generator) draws the prompt lengths or document lengths, so the layout
    is a function of the source and the generator's seed.
    """
    if kind == "causal":
        return Batch(source[:, :-1], source[:, 1:], bayes=None if nll is None else nll[:, 1:])
    if kind == "prefix_lm":
        return _prefix_lm(source, generator, prefix_max, nll)
    if kind == "document":
        return _documents(source, generator, doc_min, eos, nll)
    raise ValueError(f"data.mask must be causal, prefix_lm or document; got {kind!r}")


def _prefix_lm(source, generator, prefix_max, nll) -> Batch:
    B, T = source.shape[0], source.shape[1] - 1
    longest = max(1, int(prefix_max * T))
    prefix = torch.randint(1, longest + 1, (B,), generator=generator)  # (B,)
    scored = torch.arange(T)[None, :] >= (prefix[:, None] - 1)  # (B, T): targets outside the prompt
    targets = torch.where(scored, source[:, 1:], IGNORE)
    bayes = None if nll is None else torch.where(scored, nll[:, 1:], 0.0)
    return Batch(source[:, :-1], targets, masks.prefix_lm(prefix), bayes=bayes)


def _documents(source, generator, doc_min, eos, nll) -> Batch:
    if eos is None:
        raise ValueError("document packing needs the end token id (eos)")
    T1 = source.shape[1]  # T + 1 tokens per packed row, end tokens included
    per_row = rows_needed("document", T1 - 1, doc_min)
    B = source.shape[0] // per_row
    packed = torch.empty(B, T1, dtype=source.dtype)
    doc_ids = torch.empty(B, T1, dtype=torch.long)
    positions = torch.empty(B, T1, dtype=torch.long)
    packed_nll = torch.zeros(B, T1, dtype=torch.float64)
    scored = torch.ones(B, T1, dtype=torch.bool)
    for b in range(B):
        start, doc = 0, 0
        while start < T1:
            # a document of `length` tokens and its end token; the last one may be cut by the row's end
            length = int(torch.randint(doc_min, max(doc_min, T1 - 1) + 1, (1,), generator=generator))
            row = b * per_row + doc
            take = min(length, T1 - start)
            packed[b, start : start + take] = source[row, :take]
            if nll is not None:
                packed_nll[b, start : start + take] = nll[row, :take]
            doc_ids[b, start : start + take + 1] = doc
            positions[b, start : start + take + 1] = torch.arange(min(take + 1, T1 - start))
            if start + take < T1:
                packed[b, start + take] = eos
                scored[b, start + take] = False
            start, doc = start + take + 1, doc + 1
    # input i predicts token i + 1; the first token of a document follows an end token, and its
    # Bayes NLL is that of a sequence's first token (every document starts afresh)
    return Batch(
        packed[:, :-1],
        torch.where(scored[:, 1:], packed[:, 1:], IGNORE),
        masks.document(doc_ids[:, :-1]),
        positions[:, :-1],
        None if nll is None else torch.where(scored[:, 1:], packed_nll[:, 1:], 0.0),
    )


def lay_out_for(data_cfg, source: torch.Tensor, seed: int, eos: int, nll: torch.Tensor | None = None) -> Batch:
    """lay_out with a run's DataConfig (mask, prefix_max, doc_min), a seed for the random lengths and the end token."""
    generator = torch.Generator().manual_seed(seed)
    return lay_out(
        data_cfg.mask,
        source,
        generator,
        prefix_max=data_cfg.prefix_max,
        doc_min=data_cfg.doc_min,
        eos=eos,
        nll=nll,
    )
