"""`python -m nanollama.generate RUN_DIR --prompt "3 17 4" --max-new-tokens 50 [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--stop "0 5"] [--device cpu|cuda] [--compile]`

prints one line per --prompt: the new tokens. The run's latest checkpoint and its config.yaml are
loaded. Bad arguments (no checkpoint, tokens outside the vocabulary, ...) exit 2 with one line.
"""

from __future__ import annotations

import argparse
import sys

from nanollama.config import ConfigError
from nanollama.generate.loop import generate
from nanollama.runs import load_run
from nanollama.utils import exit_codes


def _tokens(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what} must be integers separated by spaces, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanollama.generate", description="Generate tokens from a training run's latest checkpoint."
    )
    parser.add_argument("run_dir", help="a training run directory (config.yaml, checkpoints/)")
    parser.add_argument("--prompt", action="append", required=True, help='tokens, e.g. "3 17 4"; repeat for a batch')
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", default="", help='stop tokens, e.g. "0 5"')
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU)")
    args = parser.parse_args(argv)
    try:
        prompts = [_tokens(p, "--prompt") for p in args.prompt]
        stops = _tokens(args.stop, "--stop")
        _, model = load_run(args.run_dir, args.device)
        new = generate(
            model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, stops, args.seed,
            compile=args.compile,
        )  # fmt: skip
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    for row in new:
        print(" ".join(map(str, row)))
    return 0
