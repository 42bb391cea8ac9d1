"""What cached generation is checked against: random ragged prompts, and greedy decoding of one
prompt by full recomputation (no cache or state, no batch, no padding). Shared by the Transformer's
and the recurrent models' generation tests."""

from __future__ import annotations

import torch


def random_prompts(lengths, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_alone(model, prompt: list[int], n: int) -> list[int]:
    seq, new = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([seq]))[0, -1].argmax())
        new.append(token)
        seq.append(token)
    return new
