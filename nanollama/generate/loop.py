"""Batched generation: prompts of different lengths in one batch, one prefill, then cached decode steps.

How a batch runs (the model's generation state, e.g. models/transformer/cache.py, has the cache's side):
- prefill: the prompts right-padded to the longest, plain causal attention (exact for the real
  tokens, which never see the padding after them), K/V of every slot written to the cache;
  sequence b's first new token comes from the logits at its last prompt token.
- decode: one token per sequence per step, at its own position (RoPE and cache slot = its length),
  attending through decode_attention to its own cache prefix. Shapes never change between steps,
  so the step compiles once (torch.compile; CUDA graphs with mode="reduce-overhead" on a GPU).
- a sequence that emits a stop token (kept as its last token) or reaches its budget is finished;
  the batch keeps its static shape (finished rows compute on and are discarded) and stops when
  every row is finished, checked every few steps so the host rarely waits on the device.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch

from nanollama.generate.sampling import sample
from nanollama.models import spec_of
from nanollama.utils.checks import is_int

# Rows are checked for being finished every CHECK_EVERY decode steps: each check waits for the
# device, and a finished row computing a few extra steps costs less than a sync per step.
CHECK_EVERY = 8


# ----------------------------------------------------------------------------- argument checks


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens):
    """Validated (prompts as lists of ints, budgets per prompt, stop tokens); ValueError names the argument."""
    vocab, max_seq_len = model.config.vocab_size, model.config.max_seq_len
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token lists")
    checked = []
    for b, prompt in enumerate(prompts):
        tokens = prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt
        if not isinstance(tokens, Sequence) or isinstance(tokens, str) or len(tokens) == 0:
            raise ValueError(f"prompts[{b}] must be a non-empty list of tokens, got {prompt!r}")
        for t in tokens:
            if not is_int(t) or not 0 <= t < vocab:
                raise ValueError(f"prompts[{b}]: token {t!r} is not in the vocabulary [0, {vocab})")
        checked.append(list(tokens))
    budgets = [max_new_tokens] * len(checked) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(checked) or any(not is_int(n) or n < 0 for n in budgets):
        raise ValueError(
            f"max_new_tokens must be an integer >= 0 or one per prompt ({len(checked)}), got {max_new_tokens!r}"
        )
    for b, (tokens, n) in enumerate(zip(checked, budgets)):
        # The last new token is never fed back, so the model reads at most len + n - 1 positions.
        if len(tokens) + n - 1 > max_seq_len:
            raise ValueError(
                f"prompts[{b}]: {len(tokens)} prompt tokens + max_new_tokens {n} - 1 exceeds "
                f"model.max_seq_len={max_seq_len}"
            )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    stops = list(stop_tokens)
    for t in stops:
        if not is_int(t) or not 0 <= t < vocab:
            raise ValueError(f"stop_tokens: token {t!r} is not in the vocabulary [0, {vocab})")
    return checked, budgets, stops


def _padded(prompts: list[list[int]], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (B, width) int64 (padding 0) and lengths (B,) int32, on `device`."""
    tokens = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
    return tokens.to(device), lengths.to(device)


# ----------------------------------------------------------------------------- backends


class _CachedBackend:
    """Prefill once, then one cached decode step per token (optionally compiled)."""

    def __init__(self, model, batch_size: int, max_len: int, compile: bool | str):
        self.model = model
        if compile:
            # Stable shapes across calls: the cache spans the model's whole context (decode_attention
            # reads only each sequence's prefix), and it and the compiled step are kept per model.
            self.cache, self.step_fn = _compiled_for(model, batch_size, "inductor" if compile is True else compile)
        else:
            self.cache, self.step_fn = _new_state(model, batch_size, max_len), _decode_logits

    def prefill(self, prompts: list[list[int]], device) -> torch.Tensor:
        tokens, lengths = _padded(prompts, max(map(len, prompts)), device)
        self.cache.reset(lengths)  # the prefill computes logits at each prompt's last token only
        return self.model(tokens, cache=self.cache)[:, 0]  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step_fn(self.model, tokens[:, None], self.cache)


def _new_state(model, batch_size: int, max_len: int):
    """The model's generation state (a KV cache for the Transformer), from its spec."""
    spec = spec_of(model)
    if spec.new_state is None:
        raise ValueError(f"model.arch={spec.arch} has no cached generation state (use recompute=True)")
    return spec.new_state(model, batch_size, max_len)


def _decode_logits(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """One decode step: tokens (B, 1) -> next-token logits (B, V); the cache advances by one."""
    return model(tokens, cache=cache)[:, -1]


# model -> {(batch size, dtype, device, backend): (cache, compiled step)}.
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_for(model, batch_size: int, backend: str):
    per_model = _COMPILED.setdefault(model, {})
    p = next(model.parameters())
    key = (batch_size, p.dtype, p.device, backend)
    if key not in per_model:
        # CUDA graphs on a GPU: the step's launches replay as one graph, the cache at fixed addresses.
        mode = "reduce-overhead" if p.device.type == "cuda" and backend == "inductor" else None
        cache = _new_state(model, batch_size, model.config.max_seq_len)
        # dynamic=False: each batch size gets its own static graph (dynamo keeps them all on
        # _decode_logits's code object, up to torch._dynamo.config.recompile_limit of them) rather
        # than one dynamic-shape graph after the second size.
        step = torch.compile(_decode_logits, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        per_model[key] = (cache, step)
    return per_model[key]


class _RecomputeBackend:
    """The naive baseline: the whole sequence (prompt + tokens so far) runs through the model every step."""

    def __init__(self, model, batch_size: int, max_len: int, compile: bool = False):
        self.model, self.max_len = model, max_len

    def prefill(self, prompts: list[list[int]], device) -> torch.Tensor:
        self.tokens, self.lengths = _padded(prompts, self.max_len, device)
        self.rows = torch.arange(len(prompts), device=device)
        return self._last_logits()

    def _last_logits(self) -> torch.Tensor:
        width = int(self.lengths.max())  # right padding: exact for every row's real tokens
        logits = self.model(self.tokens[:, :width])
        return logits[self.rows, self.lengths.long() - 1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        # A finished row may run past the buffer: it rewrites the last slot (its output is discarded).
        slot = self.lengths.long().clamp(max=self.max_len - 1)
        self.tokens[self.rows, slot] = tokens
        self.lengths = (slot + 1).to(torch.int32)
        return self._last_logits()


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int | None = None,
    *,
    compile: bool | str = False,
    recompute: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt, all prompts in one batch; returns one list per prompt.

    prompts: token lists of any lengths >= 1. max_new_tokens: a budget for all or one per prompt.
    temperature 0 is greedy (deterministic); otherwise softmax sampling after top_k / top_p
    filtering, reproducible with `seed` (None: torch's global generator). A prompt's generation ends
    at its budget or at the first of `stop_tokens`, which is kept as its last token.
    compile: run the decode step through torch.compile (inductor, with CUDA graphs on a GPU;
    a string names another torch.compile backend, e.g. "aot_eager"); compiled once per model,
    batch size and backend. recompute: the no-cache baseline (each step reruns the whole sequence).
    """
    prompts, budgets, stops = _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
    device = next(model.parameters()).device
    B, steps = len(prompts), max(budgets)
    out: list[list[int]] = [[] for _ in range(B)]
    if steps == 0:
        return out
    max_len = max(len(p) + n - 1 for p, n in zip(prompts, budgets))
    max_len = max(max_len, max(map(len, prompts)))  # the prefill writes the padded prompts
    backend = (_RecomputeBackend if recompute else _CachedBackend)(model, B, max_len, compile)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    budget_t = torch.tensor(budgets, device=device)
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    new = torch.empty((B, steps), dtype=torch.long, device=device)  # every step's tokens, on the device
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    logits = backend.prefill(prompts, device)
    done = steps
    for t in range(steps):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        new[:, t] = token
        finished |= torch.isin(token, stop_t) | (budget_t <= t + 1)
        if t + 1 == steps or ((t + 1) % CHECK_EVERY == 0 and bool(finished.all())):
            done = t + 1
            break
        logits = backend.step(token)

    # Cut each row at its budget or just after its first stop token, on the host, once.
    rows = new[:, :done].tolist()
    for b, (row, n) in enumerate(zip(rows, budgets)):
        row = row[:n]
        for i, token in enumerate(row):
            if token in stops:
                row = row[: i + 1]
                break
        out[b] = row
    return out
