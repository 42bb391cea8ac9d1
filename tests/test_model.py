import pytest
import torch

from nanollama.config import ConfigError
from nanollama.models.transformer import Transformer, TransformerConfig


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    args = dict(vocab_size=23, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40)
    return Transformer(TransformerConfig(**{**args, **kw}))


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_logits_shape_and_gqa(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 23, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 23) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    head_dim = 32 // 4
    assert model.layers[0].attention.wqkv.weight.shape == ((4 + 2 * n_kv_heads) * head_dim, 32)


def test_causality_later_tokens_never_change_earlier_logits():
    model = tiny()
    tokens = torch.randint(0, 23, (2, 30))
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 23
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-4  # the changed positions do see the change


def test_gqa_equals_multi_head_with_repeated_kv_weights():
    gqa = tiny(n_kv_heads=2)
    mha = tiny(n_kv_heads=4)
    D, Hq, Hk = 8, 4, 2
    with torch.no_grad():
        for lg, lm in zip(gqa.layers, mha.layers):
            q, k, v = lg.attention.wqkv.weight.split([Hq * D, Hk * D, Hk * D])
            # each kv head serves Hq / Hk consecutive query heads
            k4 = k.view(Hk, D, -1).repeat_interleave(Hq // Hk, 0).reshape(Hq * D, -1)
            v4 = v.view(Hk, D, -1).repeat_interleave(Hq // Hk, 0).reshape(Hq * D, -1)
            lm.attention.wqkv.weight.copy_(torch.cat([q, k4, v4]))
        for name, p in gqa.named_parameters():
            if "wqkv" not in name:
                dict(mha.named_parameters())[name].copy_(p)
    tokens = torch.randint(0, 23, (2, 11))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_param_count_flops_and_tied_embeddings():
    model = tiny()
    c = model.config
    per_layer = (
        (c.n_heads + 2 * c.n_kv_heads) * c.head_dim * c.dim + c.dim * c.dim + 3 * c.dim * c.hidden_dim + 2 * c.dim
    )
    expected = 2 * 23 * 32 + c.n_layers * per_layer + c.dim
    assert model.num_params() == expected
    assert model.num_params(embeddings=False) == expected - 23 * 32
    assert model.flops_per_token(40) == 6 * (expected - 23 * 32) + 12 * 2 * 4 * 8 * 40
    tied = tiny(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.num_params() == expected - 23 * 32


def test_depth_scaled_init():
    model = tiny(n_layers=8, dim=256, n_heads=4, n_kv_heads=4)
    wo = torch.cat([layer.attention.wo.weight.flatten() for layer in model.layers])
    wq = torch.cat([layer.attention.wqkv.weight.flatten() for layer in model.layers])
    assert abs(wq.std().item() - 0.02) < 0.001
    assert abs(wo.std().item() - 0.02 / 4) < 0.0005


@pytest.mark.parametrize(
    "kw, field",
    [(dict(dim=30, n_heads=4), "n_heads"), (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"), (dict(dim=0), "dim")],
)
def test_impossible_shapes_name_the_field(kw, field):
    with pytest.raises(ConfigError) as info:
        TransformerConfig(**{**dict(vocab_size=5, dim=32), **kw})
    assert info.value.field == field


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="max_seq_len=40"):
        tiny()(torch.zeros(1, 41, dtype=torch.long))


def test_peak_table_never_guesses():
    from nanollama.utils.devices import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H200 NVL", "bf16") == 835e12
    assert peak_flops("NVIDIA GH200 480GB", "bf16") == 989e12
    assert peak_flops("Some Future GPU", "bf16") is None
    assert peak_flops(None, "fp32") is None
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on a V100
