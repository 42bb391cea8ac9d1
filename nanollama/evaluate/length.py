"""RoPE length extrapolation, measured against the exact optimum of a GSSM run.

    python -m nanollama.eval_length RUN_DIR --lengths 256,512,1024 --scaling none,linear,ntk,yarn
        [--sequences 16] [--batch-size 8] [--device cpu|cuda]

loads the run's latest checkpoint and, for each length L, samples sequences of L + 1 tokens from the
run's graph (the same sequences for every scaling), scores the model on the next-token loss at each
of the L positions with each RoPE scaling, and prints one row per (length, scaling): the loss, the
Bayes-optimal loss of the same tokens (GSSM.nll, exact at every length), their difference (excess),
and the excess over only the positions the model never saw in training (at and past data.seq_len).

The scalings stretch the RoPE table from the trained context T = data.seq_len to L: factor = L / T
(1 when L <= T), original_max_seq_len = T; "none" extends the table unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from nanollama import data, models
from nanollama.config import ConfigError
from nanollama.data import seeds
from nanollama.data.gssm import GSSMSource
from nanollama.kernels.rope import SCALING_TYPES
from nanollama.runs import load_run
from nanollama.utils import exit_codes

COLUMNS = ("length", "scaling", "loss", "bayes", "excess", "excess_beyond")


def scaling_for(kind: str, length: int, trained: int) -> dict | None:
    """The rope_scaling dict that stretches a model trained on `trained` tokens to `length` tokens."""
    if kind not in SCALING_TYPES:
        raise ValueError(f"--scaling: unknown type {kind!r} (one of {', '.join(SCALING_TYPES)})")
    if kind == "none":
        return None
    return {"type": kind, "factor": max(1.0, length / trained), "original_max_seq_len": trained}


def model_for(model_cfg, state: dict, length: int, scaling: dict | None, device) -> torch.nn.Module:
    """The run's model with a RoPE table of max(length, max_seq_len) positions under `scaling`."""
    cfg = dataclasses.replace(model_cfg, max_seq_len=max(length, model_cfg.max_seq_len), rope_scaling=scaling)
    model = models.build(cfg)  # its RoPE tables come from cfg: max_seq_len positions under `scaling`
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def evaluate_lengths(
    cfg,
    state: dict,
    lengths: list[int],
    scalings: list[str],
    sequences: int = 16,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """One dict per (length, scaling) with the COLUMNS; cfg is the run's TrainConfig, state its model weights."""
    source = data.build(cfg.data)
    if not isinstance(source, GSSMSource):
        raise ValueError(f"eval_length needs GSSM data (its exact optimum); the run has data.source={cfg.data.source}")
    if not hasattr(cfg.model, "rope_scaling"):
        raise ValueError(f"eval_length stretches RoPE; model.arch={cfg.model.arch} has none")
    gssm = source.gssm
    trained = cfg.data.seq_len
    rows = []
    for length in lengths:
        seed = seeds.derive_seed(cfg.data.graph_seed, seeds.EVAL_LENGTH, length)
        tokens = gssm.sample(sequences, length + 1, seed=seed)  # (N, L + 1)
        bayes = gssm.nll(tokens, seed=seed)[:, 1:].float()  # (N, L): -log p(x_t | x_<t), t = 1..L
        for kind in scalings:
            model = model_for(cfg.model, state, length, scaling_for(kind, length, trained), device)
            losses = []
            for i in range(0, sequences, batch_size):
                chunk = tokens[i : i + batch_size].to(device)
                logits = model(chunk[:, :-1])  # (b, L, V) float32
                nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")  # (b, L)
                losses.append(nll.cpu())
            loss = torch.cat(losses)  # (N, L)
            excess = loss - bayes
            # Position t (0-based) predicts token t + 1 from t + 1 tokens; training saw t < trained.
            beyond = excess[:, trained:]
            rows.append(
                {
                    "length": length,
                    "scaling": kind,
                    "loss": loss.mean().item(),
                    "bayes": bayes.mean().item(),
                    "excess": excess.mean().item(),
                    "excess_beyond": beyond.mean().item() if beyond.numel() else math.nan,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'length':>7}  {'scaling':<8} {'loss':>8} {'bayes':>8} {'excess':>8} {'excess_beyond':>13}"]
    for r in rows:
        beyond = "-" if math.isnan(r["excess_beyond"]) else f"{r['excess_beyond']:.4f}"
        lines.append(
            f"{r['length']:>7}  {r['scaling']:<8} {r['loss']:>8.4f} {r['bayes']:>8.4f} {r['excess']:>8.4f} {beyond:>13}"
        )
    return "\n".join(lines)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanollama.eval_length", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a GSSM training run directory (config.yaml, checkpoints/)")
    parser.add_argument("--lengths", default="256,512,1024", help="comma-separated evaluation lengths")
    kinds = ", ".join(SCALING_TYPES)
    parser.add_argument("--scaling", default="none,linear,ntk,yarn", help=f"comma-separated: {kinds}")
    parser.add_argument("--sequences", type=int, default=16, help="sequences scored per length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    args = parser.parse_args(argv)
    try:
        lengths = _ints(args.lengths, "--lengths")
        scalings = [s.strip() for s in args.scaling.split(",") if s.strip()]
        for kind in scalings:
            scaling_for(kind, 1, 1)  # unknown names fail before any work
        if not scalings:
            raise ValueError("--scaling must name at least one scaling")
        if args.sequences < 1 or args.batch_size < 1:
            raise ValueError("--sequences and --batch-size must be >= 1")
        cfg, model = load_run(args.run_dir, args.device)
        device = next(model.parameters()).device
        state = model.state_dict()
        del model
        print(f"run {Path(args.run_dir)}: trained on data.seq_len={cfg.data.seq_len} tokens")
        rows = evaluate_lengths(cfg, state, lengths, scalings, args.sequences, args.batch_size, device)
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    print(format_table(rows))
    return 0
