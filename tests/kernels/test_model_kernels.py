"""The kernels as the model uses them: one prepared mask per forward, and float64 end to end."""

from __future__ import annotations

import pytest
import torch

from nanollama.kernels import attention_backends, masks
from nanollama.models.transformer import Transformer, TransformerConfig


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**{**dict(vocab_size=11, dim=32, n_layers=3, n_heads=4, n_kv_heads=2), **kw}))


@pytest.mark.parametrize("mode", ["auto", "triton", "reference"])
def test_float64_model_forward_and_backward(monkeypatch, mode):
    """float64 takes the reference kernels (RoPE, attention) in every mode, on the CPU as on CUDA."""
    monkeypatch.setenv("NANOLLAMA_KERNELS", mode)
    model = _model().double()
    tokens = torch.randint(0, 11, (2, 9))
    logits = model(tokens)  # the model hands out float32 logits, whatever its dtype
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
    # float64 against float32 of the same weights: the same function up to float32 rounding
    model32 = _model()
    torch.testing.assert_close(model32(tokens), logits, atol=1e-4, rtol=1e-4)


def test_model_prepares_the_mask_once_per_forward(monkeypatch):
    calls = []
    real = attention_backends.build
    attention_mod = __import__("nanollama.kernels.attention", fromlist=["build"])
    monkeypatch.setattr(attention_mod, "build", lambda *a: calls.append(a[0]) or real(*a))
    model = _model()
    ids = torch.sort(torch.randint(0, 3, (2, 9)), dim=1).values
    with torch.no_grad():
        out = model(torch.randint(0, 11, (2, 9)), mask=masks.document(ids))
    assert len(calls) == 1 and torch.isfinite(out).all()  # three layers, one build
