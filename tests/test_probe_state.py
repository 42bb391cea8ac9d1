"""The probe's "state" site: the recurrent state each recurrent layer carries from one step to the next
(minGRU / minLSTM / Hawk h, Mamba-2's S_t), read by a hook during an ordinary forward."""

from __future__ import annotations

import pytest
import torch
from recurrent_models import ARCHS, VOCAB, tiny

from nanollama import models
from nanollama.probe.activations import activations, layer_names, resolve_layers


@pytest.mark.parametrize("arch", ARCHS)
def test_the_state_site_is_the_generation_state_after_each_prefix(arch):
    """At step t the site holds what a prefill of tokens[:, :t + 1] leaves in the layer's state "h"."""
    model = tiny(arch, gain=3.0)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    recurrent = [i for i in range(len(model.layers)) if i not in model.attention_index]
    assert [k for k in layer_names(model, ("state",)) if k.endswith(".state")] == [
        f"layer.{i}.state" for i in recurrent
    ]
    acts = activations(model, tokens, sites=("state",))
    spec = models.spec_of(model)
    for t in (0, 4, 12):  # 4 and 12 cross Mamba-2's chunk boundary (chunk_size 5)
        state = spec.new_state(model, 2, 32)
        state.reset(torch.tensor([t + 1, t + 1]))
        model(tokens[:, : t + 1], cache=state)
        for i in recurrent:
            h = state.tensors[i]["h"].reshape(2, -1)  # (B, F)
            assert acts[f"layer.{i}.state"].shape == (2, 13, h.shape[1])
            torch.testing.assert_close(acts[f"layer.{i}.state"][:, t], h, atol=2e-5, rtol=2e-5)


def test_hooking_the_state_leaves_the_logits_unchanged_and_resets_at_documents():
    from nanollama.kernels import masks

    model = tiny("mamba2", gain=3.0)
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    plain = model(tokens)
    states = []
    handle = model.layers[0].mixer.state_site.register_forward_hook(lambda m, a, out: states.append(out))
    try:
        torch.testing.assert_close(model(tokens), plain, atol=0, rtol=0)
        positions = torch.cat([torch.arange(7), torch.arange(5)])[None]  # a second document from t = 7
        ids = (torch.arange(12) >= 7).long()[None]
        model(tokens, mask=masks.document(ids), positions=positions)
        model(tokens[:, 7:])
    finally:
        handle.remove()
    assert not model.layers[0].mixer.state_site.watched
    torch.testing.assert_close(states[1][:, 7:], states[2], atol=2e-5, rtol=2e-5)  # the packed one restarts


def test_a_transformer_has_no_state_site():
    cfg = models.config_class("transformer")(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, max_seq_len=32)
    model = models.build(cfg)
    with pytest.raises(ValueError, match=r"^site 'state' does not exist in model.arch=transformer: no block keeps"):
        resolve_layers(model, None, ("resid", "state"))
    assert "layer.0.state" not in layer_names(model, ("resid", "state"))
