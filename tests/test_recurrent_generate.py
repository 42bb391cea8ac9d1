"""generate() on the recurrent archs and a hybrid: the constant-size state, ragged prompts in one batch."""

from __future__ import annotations

import pytest
from greedy import greedy_alone, random_prompts
from recurrent_models import ARCHS, VOCAB, tiny

from nanollama.generate import generate


def ragged_prompts(lengths, seed: int = 1) -> list[list[int]]:
    return random_prompts(lengths, VOCAB, seed)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_recomputation_token_by_token_with_ragged_prompts(arch):
    model = tiny(arch, gain=4.0)
    prompts = ragged_prompts([1, 9, 4, 13, 2])
    cached = generate(model, prompts, 10)
    assert cached == generate(model, prompts, 10, recompute=True)
    for prompt, got in zip(prompts, cached):
        assert got == greedy_alone(model, prompt, 10)
    assert len({tuple(c) for c in cached}) > 1  # the prompts lead somewhere different


@pytest.mark.parametrize("arch", ["hawk", "hybrid"])
def test_stops_budgets_and_a_reused_state(arch):
    model = tiny(arch, gain=4.0)
    prompts = ragged_prompts([3, 6])
    first = generate(model, prompts, [4, 7])
    assert [len(r) for r in first] == [4, 7]
    stop = first[1][2]
    stopped = generate(model, prompts, [4, 7], stop_tokens=[stop])
    assert stopped[1] == first[1][: first[1].index(stop) + 1]
    assert generate(model, prompts, [4, 7]) == first  # a second run starts from a zeroed state


def test_sampling_matches_the_recompute_path_with_a_seed():
    model = tiny("mamba2", gain=2.0)
    prompts = ragged_prompts([2, 5, 8])
    a = generate(model, prompts, 8, temperature=1.0, seed=7)
    assert a == generate(model, prompts, 8, temperature=1.0, seed=7, recompute=True)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager_for_a_recurrent_and_a_hybrid_model():
    """torch.compile (aot_eager, fullgraph) of the decode step through the recurrent state (about 8 s)."""
    for arch in ("hawk", "hybrid"):
        model = tiny(arch, gain=4.0)
        prompts = ragged_prompts([3, 5])
        assert generate(model, prompts, 6, compile="aot_eager") == generate(model, prompts, 6)
