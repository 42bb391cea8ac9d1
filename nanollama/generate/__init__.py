"""Generation: `generate(model, prompts, max_new_tokens, ...)` (loop.py), sampling (sampling.py) and the
`python -m nanollama.generate` command (cli.py)."""

from nanollama.generate.cli import main
from nanollama.generate.loop import CHECK_EVERY, generate
from nanollama.generate.sampling import filter_logits, sample

__all__ = ["CHECK_EVERY", "filter_logits", "generate", "main", "sample"]
