"""Tiny configs of every recurrent arch for the tests (a shared helper, not a test module)."""

from __future__ import annotations

import torch

from nanollama import models

VOCAB = 23
ARCHS = ("mingru", "minlstm", "hawk", "mamba2", "hybrid")
# Small and odd where it matters: conv widths and chunk sizes that do not divide the lengths.
TINY = {
    "mingru": {"dim": 16, "n_layers": 2},
    "minlstm": {"dim": 16, "n_layers": 2},
    "hawk": {"dim": 16, "n_layers": 2, "conv_width": 3, "lru_heads": 2},
    "mamba2": {"dim": 16, "n_layers": 2, "state_dim": 4, "ssm_head_dim": 8, "chunk_size": 5, "conv_width": 3},
    "hybrid": {"dim": 16, "n_layers": 3, "pattern": "RA", "n_heads": 2, "max_seq_len": 64},
}


def config(arch: str, **kw):
    return models.config_class(arch)(vocab_size=VOCAB, **{**TINY[arch], **kw})


def tiny(arch: str, gain: float = 1.0, seed: int = 0, **kw):
    """A random model; gain scales the matrices so greedy choices have clear margins."""
    model = models.build(config(arch, **kw))
    models.reset_parameters(model, seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(gain)
    return model.eval()
