"""Batched generation with the KV cache: exact against full recomputation, stops, sampling, compile, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from greedy import greedy_alone, random_prompts
from tiny_run import train_tiny_run

from nanollama.generate import cli as gen
from nanollama.generate import filter_logits, generate, loop, sample
from nanollama.models.transformer import KVCache, Transformer, TransformerConfig
from nanollama.runs import load_run

VOCAB = 29


def tiny(n_layers: int = 2, max_seq_len: int = 40, gain: float = 12.0, **kw) -> Transformer:
    """A random model whose weights are scaled up: its next-token distributions are far from uniform,
    so greedy choices have clear margins and generations vary from step to step."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=max_seq_len)
    model = Transformer(TransformerConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(gain)
    return model.eval()


def ragged_prompts(lengths, seed: int = 1) -> list[list[int]]:
    return random_prompts(lengths, VOCAB, seed)


# ----------------------------------------------------------------------------- exactness


def test_cached_greedy_equals_recomputation_token_by_token_for_prompts_of_lengths_1_to_20():
    model = tiny()
    prompts = ragged_prompts(range(1, 21))
    n = 12
    cached = generate(model, prompts, n)
    batched_recompute = generate(model, prompts, n, recompute=True)
    for b, prompt in enumerate(prompts):
        alone = greedy_alone(model, prompt, n)
        for t in range(n):
            assert cached[b][t] == alone[t], f"prompt {b} (length {len(prompt)}): token {t} differs"
        assert batched_recompute[b] == alone
    assert len({tuple(r) for r in cached}) > 10  # the rows differ: the comparison is not vacuous
    assert sum(len(set(r)) for r in cached) > 3 * len(prompts)


def test_prefill_plus_decode_logits_equal_full_sequence_logits():
    model = tiny()
    lengths = [1, 7, 3, 12]
    prompts = ragged_prompts(lengths, seed=2)
    extra = ragged_prompts([6] * len(lengths), seed=3)  # teacher-forced continuations
    cache = KVCache.for_model(model, len(prompts), max_len=20)
    with torch.no_grad():
        padded = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
        for b, p in enumerate(prompts):
            padded[b, : len(p)] = torch.tensor(p)
        prefill = model(padded, cache=cache)  # (B, S, V)
        cache.start_decode(torch.tensor(lengths))
        steps = [model(torch.tensor([[e[t]] for e in extra]), cache=cache)[:, 0] for t in range(6)]  # 6 x (B, V)
        assert cache.seqlens.tolist() == [n + 6 for n in lengths]
        for b, (p, e) in enumerate(zip(prompts, extra)):
            full = model(torch.tensor([p + e]))[0]  # (len + 6, V)
            torch.testing.assert_close(prefill[b, : len(p)], full[: len(p)], rtol=1e-5, atol=1e-5)
            for t in range(6):
                torch.testing.assert_close(steps[t][b], full[len(p) + t], rtol=1e-5, atol=1e-5)
        # reset(lengths): the prefill returns each prompt's last-token logits only, and starts decoding
        cache.reset(torch.tensor(lengths))
        last = model(padded, cache=cache)
        assert last.shape == (len(prompts), 1, VOCAB) and cache.decoding
        assert cache.seqlens.tolist() == lengths
        torch.testing.assert_close(last[:, 0], prefill[torch.arange(len(prompts)), torch.tensor(lengths) - 1])
        after = model(torch.tensor([[e[0]] for e in extra]), cache=cache)[:, 0]
        torch.testing.assert_close(after, steps[0])


def test_padding_slots_may_hold_nan_they_are_never_read():
    """Prefill writes K/V for the padding too; decode must read only each sequence's own prefix."""
    model = tiny(n_layers=1)
    prompts = ragged_prompts([2, 9], seed=4)
    want = generate(model, prompts, 5)
    backend = loop._CachedBackend(model, 2, 13, compile=False)
    backend.cache.fill_(float("nan"))
    with torch.no_grad():
        logits = backend.prefill(prompts, torch.device("cpu"))
        for i in range(model.config.n_layers):
            k, v = backend.cache.layer(i)
            k[0, :, 2:], v[0, :, 2:] = float("nan"), float("nan")  # sequence 0's padding slots
        got = []
        for _ in range(5):
            token = logits.argmax(-1)
            got.append(token.tolist())
            logits = backend.step(token)
    assert [list(r) for r in zip(*got)] == want


def test_triton_decode_path_under_the_interpreter_matches_the_reference(monkeypatch):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")
    model = tiny(n_layers=1, max_seq_len=16)
    prompts = ragged_prompts([1, 5, 3], seed=5)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "reference")
    want = generate(model, prompts, 4)
    monkeypatch.setenv("NANOLLAMA_KERNELS", "triton")
    assert generate(model, prompts, 4) == want


# ----------------------------------------------------------------------------- stopping


def test_each_sequence_stops_at_its_stop_token_or_budget_while_the_others_go_on():
    model = tiny()
    prompts = ragged_prompts([4, 1, 9, 6], seed=6)
    free = generate(model, prompts, 10)
    stop = free[0][3]  # a token row 0 emits at step 3 (maybe earlier too)
    stopped = generate(model, prompts, 10, stop_tokens=[stop])
    for row, full in zip(stopped, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]  # kept up to and including the first stop token
    assert len(stopped[0]) <= 4 and any(len(r) == 10 for r in stopped)

    budgets = [3, 0, 10, 1]
    assert generate(model, prompts, budgets) == [full[:n] for full, n in zip(free, budgets)]


def test_the_batch_ends_early_when_every_sequence_has_stopped():
    model = tiny(n_layers=1)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    out = generate(model, ragged_prompts([3, 5]), 30, stop_tokens=range(VOCAB))  # every token stops
    assert [len(r) for r in out] == [1, 1]
    assert len(calls) <= loop.CHECK_EVERY  # the prefill and fewer than CHECK_EVERY decode steps, not 30


def test_zero_budget_and_single_token_prompts():
    model = tiny(n_layers=1)
    assert generate(model, [[1], [2, 3]], 0) == [[], []]
    assert generate(model, [[5]], 1) == [greedy_alone(model, [5], 1)]


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seed_and_matches_the_recompute_path():
    model = tiny(gain=3.0)  # flatter distributions: draws vary
    prompts = ragged_prompts([2, 7, 4], seed=7)
    a = generate(model, prompts, 15, temperature=1.0, seed=11)
    assert generate(model, prompts, 15, temperature=1.0, seed=11) == a
    assert generate(model, prompts, 15, temperature=1.0, seed=12) != a
    assert generate(model, prompts, 15, temperature=1.0, seed=11, recompute=True) == a
    assert generate(model, prompts, 15, temperature=1.0, top_k=1, seed=5) == generate(model, prompts, 15)


def test_greedy_is_deterministic():
    model = tiny()
    prompts = ragged_prompts([3, 8], seed=8)
    assert generate(model, prompts, 10) == generate(model, prompts, 10)


PROBS = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])  # ranked: 1 (0.5), 3 (0.2), 4 (0.15), 0 (0.1), 2 (0.05)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (None, None, {0, 1, 2, 3, 4}),
        (1, None, {1}),
        (2, None, {1, 3}),
        (4, None, {0, 1, 3, 4}),
        (9, None, {0, 1, 2, 3, 4}),
        (None, 0.5, {1}),  # token 3 has 0.5 ranked ahead of it: the nucleus already holds p
        (None, 0.6, {1, 3}),
        (None, 0.71, {1, 3, 4}),
        (None, 0.9, {0, 1, 3, 4}),
        (None, 1.0, {0, 1, 2, 3, 4}),
        (3, 0.6, {1, 3}),  # after top-3 the probabilities are 0.59, 0.24, 0.18
        (3, 0.9, {1, 3, 4}),
    ],
)
def test_filter_logits_keeps_exactly_the_top_k_and_nucleus(top_k, top_p, kept):
    logits = PROBS.log()[None].repeat(2, 1) + torch.tensor([[0.0], [3.0]])  # a shift changes nothing
    out = filter_logits(logits, top_k, top_p)
    idx = sorted(kept)
    for row, original in zip(out, logits):
        assert {i for i in range(5) if torch.isfinite(row[i])} == kept
        assert torch.equal(row[idx], original[idx])  # the kept logits are untouched


def test_sample_draws_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    logits = PROBS.log()[None].expand(n, 5)
    draws = sample(logits, temperature=1.0, top_k=3, generator=g)
    freq = torch.bincount(draws, minlength=5).double() / n
    want = torch.tensor([0, 0.5, 0, 0.2, 0.15], dtype=torch.float64) / 0.85
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    draws = sample(logits, temperature=2.0, top_p=0.71, generator=g)  # T=2: probs ~ sqrt(p), then the nucleus
    hot = PROBS.sqrt() / PROBS.sqrt().sum()
    keep = filter_logits(hot.log()[None], None, 0.71)[0].isfinite()
    want = torch.where(keep, hot, 0).double() / hot[keep].sum()
    freq = torch.bincount(draws, minlength=5).double() / n
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)
    assert sample(logits[:3], temperature=0.0).tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------- compile


def test_compiled_decode_step_traces_one_graph_and_never_recompiles():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny(n_layers=1, max_seq_len=24)
    prompts = ragged_prompts([1, 6, 3], seed=9)
    eager = generate(model, prompts, 10)
    # aot_eager: dynamo's trace and AOTAutograd's functionalisation of the in-place cache writes, as
    # inductor sees them, without inductor's minute of C++ compilation on 2 CPU cores.
    assert generate(model, prompts, 10, compile="aot_eager") == eager
    other = ragged_prompts([9, 2, 5], seed=10)  # new lengths and tokens, same batch size
    assert generate(model, other, 7, compile="aot_eager") == generate(model, other, 7)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["graph_break"].values()) == 0
    assert not counters["recompiles"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty"),
        (dict(prompts=[[1, VOCAB]]), r"prompts\[0\]: token 29 is not in the vocabulary \[0, 29\)"),
        (dict(prompts=[[1, -1]]), r"prompts\[0\]: token -1"),
        (dict(prompts=[]), "prompts must be a non-empty list"),
        (dict(max_new_tokens=40), r"prompts\[0\]: 2 prompt tokens \+ max_new_tokens 40 - 1 exceeds model.max_seq_len"),
        (dict(max_new_tokens=[1, 2, 3]), "max_new_tokens must be"),
        (dict(max_new_tokens=-1), "max_new_tokens must be"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop_tokens=[VOCAB + 3]), "stop_tokens: token 32"),
    ],
)
def test_bad_arguments_raise_one_line_errors_naming_them(kwargs, match):
    model = tiny(n_layers=1)
    args = dict(prompts=[[1, 2], [3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_cache_shape_errors():
    model = tiny(n_layers=1, max_seq_len=16)
    with pytest.raises(ValueError, match="max_len=20 exceeds model.max_seq_len=16"):
        model(torch.zeros((2, 3), dtype=torch.long), cache=KVCache.for_model(model, 2, 20))
    with pytest.raises(ValueError, match="batch 3 does not match"):
        model(torch.zeros((3, 3), dtype=torch.long), cache=KVCache.for_model(model, 2, 8))
    cache = KVCache.for_model(model, 2, 8)
    cache.start_decode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one token per sequence, got 2"):
        model(torch.zeros((2, 2), dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        KVCache(1, 0, 1, 8, 4)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("gen") / "run")


def test_cli_round_trip_on_a_trained_run(run_dir, capsys):
    code = gen.main([str(run_dir), "--prompt", "3 1 4", "--prompt", "2", "--max-new-tokens", "6"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    _, model = load_run(run_dir, "cpu")
    assert [list(map(int, line.split())) for line in lines] == generate(model, [[3, 1, 4], [2]], 6)
    assert all(len(line.split()) == 6 for line in lines)
    args = [str(run_dir), "--prompt", "5 5", "--max-new-tokens", "8", "--temperature", "1", "--seed", "3"]
    assert gen.main(args) == 0 and gen.main(args) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second


@pytest.mark.slow
def test_cli_as_a_module(run_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(gen.__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "nanollama.generate", str(run_dir), "--prompt", "3 7 4", "--max-new-tokens", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tokens = [int(t) for t in proc.stdout.split()]
    vocab = load_run(run_dir, "cpu")[0].model.vocab_size
    assert len(tokens) == 5 and all(0 <= t < vocab for t in tokens)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "3 99"], "token 99 is not in the vocabulary [0, "),
        (["--prompt", "3 x"], "--prompt must be integers"),
        (["--prompt", "3", "--stop", "40"], "stop_tokens: token 40"),
        (["--prompt", "3", "--max-new-tokens", "500"], "exceeds model.max_seq_len=128"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(run_dir, capsys, argv, match):
    assert gen.main([str(run_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_cli_without_checkpoint_or_config_exits_2(tmp_path, capsys, run_dir):
    assert gen.main([str(tmp_path / "nope"), "--prompt", "1"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert gen.main([str(tmp_path), "--prompt", "1"]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert gen.main([str(tmp_path), "--prompt", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no complete checkpoint under") and "\n" not in err


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_triton_and_cuda_graph_generation_equal_recomputation():
    """On a GPU: Triton decode_attention + Triton RoPE, eager and compiled (inductor, CUDA graphs)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny(max_seq_len=64).cuda()
    prompts = ragged_prompts(range(1, 21))
    want = generate(model, prompts, 12, recompute=True)
    assert generate(model, prompts, 12) == want
    assert generate(model, prompts, 12, compile=True) == want
    other = ragged_prompts([17, 3, 9, 1] * 5, seed=12)  # same batch size: the compiled step is reused
    assert generate(model, other, 9, compile=True) == generate(model, other, 9, recompute=True)
    counters = torch._dynamo.utils.counters
    print("dynamo/inductor counters:", {k: dict(v) for k, v in counters.items() if v})
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert not counters["inductor"].get("cudagraph_skips"), "the decode step did not run as a CUDA graph"


@pytest.mark.gpu
def test_gpu_bf16_generation_runs_and_the_cache_is_bf16():
    model = tiny(max_seq_len=64).cuda().to(torch.bfloat16)
    prompts = ragged_prompts([5, 12, 1], seed=13)
    out = generate(model, prompts, 10, compile=True)
    assert [len(r) for r in out] == [10, 10, 10] and all(0 <= t < VOCAB for r in out for t in r)
    assert KVCache.for_model(model, 2, 8).dtype == torch.bfloat16


def test_a_config_yaml_that_does_not_fit_the_weights_is_one_line(run_dir, tmp_path, capsys):
    """An edited (or emptied) config.yaml is one line and exit 2, not DCP's traceback."""
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["model"]["dim"] = 64
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert gen.main([str(copy), "--prompt", "1 2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit the run's config.yaml model" in err and err.count("\n") == 1
    (copy / "config.yaml").write_text("")
    assert gen.main([str(copy), "--prompt", "1 2"]) == 2
    assert "config.yaml is empty" in capsys.readouterr().err
