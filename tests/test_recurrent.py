"""The recurrent models (minGRU, minLSTM, Hawk, Mamba-2, hybrid): shapes, causality, init, FLOPs,
configs, and chunked training forward equal to stepwise generation."""

from __future__ import annotations

import math

import pytest
import torch
from recurrent_models import ARCHS, TINY, VOCAB, config, tiny

from nanollama import config as cfgload
from nanollama import models
from nanollama.config import ConfigError
from nanollama.distributed.fsdp import init_weights
from nanollama.train.config import TrainConfig


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_causality_and_gradients(arch):
    model = tiny(arch)
    tokens = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    later = model(changed)
    assert torch.equal(logits[:, :6], later[:, :6])  # later tokens never change earlier logits
    assert not torch.allclose(logits[:, 6:], later[:, 6:])
    model(tokens).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_training_forward_equals_stepwise_generation(arch):
    """A one-token prefill, then decode steps through the generation state, give the full forward's logits."""
    model = tiny(arch, gain=3.0)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    spec = models.spec_of(model)
    state = spec.new_state(model, 2, 32)
    state.reset(torch.tensor([1, 1]))
    steps = [model(tokens[:, :1], cache=state)[:, -1]]
    for t in range(1, 13):
        steps.append(model(tokens[:, t : t + 1], cache=state)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_ragged_prefill_leaves_each_row_the_state_of_its_own_prompt(arch):
    """Right-padded prompts in one prefill: each row's state and next logits equal its prompt run alone."""
    model = tiny(arch, gain=3.0)
    g = torch.Generator().manual_seed(2)
    lengths = [7, 2, 5]
    tokens = torch.randint(0, VOCAB, (3, 7), generator=g)
    state = models.spec_of(model).new_state(model, 3, 32)
    state.reset(torch.tensor(lengths))
    batched = model(tokens, cache=state)[:, 0]  # (B, V) at each prompt's last token
    nxt = torch.randint(0, VOCAB, (3, 1), generator=g)
    batched_next = model(nxt, cache=state)[:, 0]
    for b, n in enumerate(lengths):
        alone = model(torch.cat([tokens[b : b + 1, :n], nxt[b : b + 1]], 1))
        torch.testing.assert_close(batched[b], alone[0, n - 1], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(batched_next[b], alone[0, n], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_values_depend_on_seed_and_name_alone(arch):
    """What FSDP's init_weights writes on any world size: the same value however (and on what) it was built."""
    a, b = tiny(arch, seed=3), tiny(arch, seed=3)
    spec = models.spec_of(a)
    with torch.device("meta"):
        meta = models.build(config(arch))
    for name, p in a.named_parameters():
        assert torch.equal(p, b.get_parameter(name)), name
        assert torch.equal(spec.initial_value(meta, name, 3), p.detach()), name
    other = tiny(arch, seed=4)
    assert not torch.equal(other.output.weight, a.output.weight)
    fresh = models.build(config(arch))
    init_weights(fresh, 3)  # the path a sharded run takes (here on one process: plain tensors)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, a.get_parameter(name)), name


def test_paper_initialisations():
    hawk = tiny("hawk")
    lam = hawk.layers[0].mixer.decay.detach()
    a_c = torch.sigmoid(lam) ** 8
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    ssd = tiny("mamba2").layers[0].mixer
    A = -torch.exp(ssd.A_log.detach())
    dt = torch.nn.functional.softplus(ssd.dt_bias.detach())
    assert A.max() <= -1 + 1e-6 and A.min() >= -16 - 1e-4
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    assert torch.equal(ssd.D.detach(), torch.ones_like(ssd.D))


def _matmul_flops_by_hooks(model, seq_len: int) -> float:
    """Forward FLOPs per token counted from every nn.Linear actually run (2 * in * out per row)."""
    total = [0.0]

    def hook(module, args, out):
        total[0] += 2.0 * module.in_features * module.out_features * args[0].shape[:-1].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, seq_len, dtype=torch.long))
    for h in handles:
        h.remove()
    return total[0] / seq_len


@pytest.mark.parametrize("arch", ARCHS)
def test_flops_per_token_is_within_a_factor_of_the_counted_matmuls(arch):
    model = tiny(arch)
    counted = 3 * _matmul_flops_by_hooks(model, 16)  # forward + backward (twice the forward)
    flops = models.spec_of(model).flops_per_token(model, 16)
    assert counted <= flops <= 3 * counted, (flops, counted)
    recompute = models.spec_of(model).recompute_flops_per_token(model, 16)
    assert 0 < recompute < flops


def test_state_size_is_constant_in_the_sequence_length():
    model = tiny("mamba2")
    ssd = model.layers[0].mixer
    expected = 2 * (ssd.H * ssd.P * ssd.N + (ssd.conv.width - 1) * ssd.conv_channels)
    assert model.state_numel() == expected
    for max_len in (8, 64):
        assert models.spec_of(model).new_state(model, 2, max_len).state_numel() == expected


def test_hybrid_reuses_the_transformer_block_and_its_kv_cache():
    from nanollama.models.transformer.model import Block

    model = tiny("hybrid", n_layers=5, pattern="RRA")
    assert [isinstance(b, Block) for b in model.layers] == [False, False, True, False, False]
    state = models.spec_of(model).new_state(model, 2, 16)
    assert state.kv is not None and len(state.kv.k) == 1 and state.kv.k[0].shape == (2, 2, 16, 8)


def _load(overrides):
    return cfgload.load(TrainConfig, None, overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.arch=rnn"], r"model\.arch: unknown architecture 'rnn'.*hawk.*mamba2.*mingru"),
        (["model.arch=hawk", "model.conv_width=0"], r"model\.conv_width: must be in \[1, 16\], got 0"),
        (["model.arch=hawk", "model.lru_heads=5"], r"model\.lru_heads: must divide expand \* dim = 128, got 5"),
        (["model.arch=mingru", "model.expand=0"], r"model\.expand: must be >= 1, got 0"),
        (["model.arch=mamba2", "model.ssm_head_dim=48"], r"model\.ssm_head_dim: must divide expand \* dim = 256"),
        (["model.arch=mamba2", "model.n_groups=3"], r"model\.n_groups: must divide the SSM heads \(16\), got 3"),
        (["model.arch=mamba2", "model.conv_width=17"], r"model\.conv_width: must be in \[1, 16\]"),
        (["model.arch=hybrid", "model.pattern=RXA"], r"model\.pattern: must be a non-empty string of R .* 'RXA'"),
        (["model.arch=hybrid", "model.recurrent=lstm"], r"model\.recurrent"),
        (["model.arch=hybrid", "model.n_heads=3"], r"model\.n_heads: dim=128 is not divisible by n_heads=3"),
        (["model.arch=mingru", "data.mask=prefix_lm"], r"data\.mask: model\.arch=mingru cannot train with prefix_lm"),
    ],
)
def test_bad_configs_are_one_line_naming_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        _load(overrides)
    assert "\n" not in str(e.value)


def test_a_hybrid_accepts_prefix_lm_and_a_pure_rnn_has_no_context_limit():
    cfg = _load(["model.arch=hybrid", "data.mask=prefix_lm"])
    assert cfg.model.layer_kinds == "RR" and cfg.model.expand == 1
    cfg = _load(["model.arch=mamba2", "data.seq_len=4096"])
    assert cfg.model.expand == 2 and math.isfinite(cfg.model.max_seq_len)


def test_a_hybrid_passes_the_mask_to_its_attention_blocks_only():
    """Under a prefix-LM mask the attention block sees the whole prompt: logits inside the prompt change
    with a later prompt token; under the causal mask they do not."""
    from nanollama.kernels import masks

    model = tiny("hybrid", n_layers=2, pattern="RA")
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = masks.prefix_lm(torch.tensor([5, 5]))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % VOCAB
    a, b = model(tokens, mask=mask), model(changed, mask=mask)
    assert not torch.allclose(a[:, :4], b[:, :4])  # position < 4 sees token 4 through attention
    causal_a, causal_b = model(tokens), model(changed)
    assert torch.equal(causal_a[:, :4], causal_b[:, :4])


def test_every_arch_accepts_document_packing():
    for overrides in (["model.arch=mamba2"], ["model.arch=hybrid", "model.recurrent=mamba2"], ["model.arch=minlstm"]):
        assert _load([*overrides, "data.mask=document"]).data.mask == "document"


HYBRIDS = {"hybrid": {"pattern": "RA"}, "hybrid_mamba2": {"pattern": "RA", "recurrent": "mamba2", **TINY["mamba2"]}}


@pytest.mark.parametrize("arch", ["mingru", "minlstm", "hawk", "mamba2", "hybrid", "hybrid_mamba2"])
def test_packed_documents_reset_the_state_each_document_as_if_alone(arch):
    """Under document packing (positions restart at 0), a document's logits equal those of it run alone.
    Mamba-2's chunk_size 5 puts one document start on a chunk boundary (5) and one inside a chunk (6)."""
    from nanollama.kernels import masks

    kw = {**HYBRIDS.get(arch, {}), "n_layers": 2}
    model = tiny(arch.split("_")[0], gain=3.0, **kw)
    g = torch.Generator().manual_seed(6)
    lengths = [5, 1, 7]  # a one-token document too
    docs = [torch.randint(0, VOCAB, (1, n), generator=g) for n in lengths]
    tokens = torch.cat(docs, 1)  # (1, 13)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = model(tokens, mask=masks.document(ids), positions=positions)
    start = 0
    for doc, n in zip(docs, lengths):
        torch.testing.assert_close(packed[:, start : start + n], model(doc), atol=2e-5, rtol=2e-5)
        start += n
    assert not torch.allclose(packed[:, 6:], model(tokens)[:, 6:])  # without the resets, context leaks
