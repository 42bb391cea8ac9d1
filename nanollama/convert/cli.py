"""`python -m nanollama.convert RUN_DIR --to-hf OUT [--checkpoint STEP] [--dtype float32|bfloat16|float16]`

writes OUT/config.json + OUT/model.safetensors, which transformers' LlamaForCausalLM.from_pretrained(OUT)
loads. The weights are the run's latest complete checkpoint, or step STEP's. Bad input (no run, no such
checkpoint, a model that is not a Transformer, an OUT that already holds a model) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanollama.config import ConfigError
from nanollama.models.transformer import ConvertError, Transformer, save_hf
from nanollama.runs import RunError, load_run
from nanollama.train import checkpoint
from nanollama.utils import exit_codes


def _checkpoint_path(run_dir: Path, step: int | None) -> Path | None:
    if step is None:
        return None  # load_run takes the latest
    path = checkpoint.step_dir(run_dir / "checkpoints", step)
    if not (path / checkpoint.MARKER).is_file():
        steps = checkpoint.complete_steps(run_dir / "checkpoints")
        raise RunError(f"--checkpoint {step}: no complete checkpoint at {path} (complete steps: {steps or 'none'})")
    return path


def to_hf_dir(
    run_dir: Path, out: Path, step: int | None = None, dtype: str = "float32", overwrite: bool = False
) -> Path:
    if out.exists() and not overwrite and any((out / name).exists() for name in ("config.json", "model.safetensors")):
        raise ConvertError(f"--to-hf: {out} already holds a model; pass --overwrite to replace it")
    _, model = load_run(run_dir, "cpu", _checkpoint_path(run_dir, step))
    if not isinstance(model, Transformer):
        raise ConvertError(f"{run_dir}: model.arch={type(model).__name__} has no Llama format (only transformer)")
    return save_hf(model, out, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanollama.convert", description="Export a training run's weights as a Hugging Face Llama."
    )
    parser.add_argument("run_dir", type=Path, help="a training run directory (config.yaml, checkpoints/)")
    parser.add_argument(
        "--to-hf", type=Path, required=True, metavar="OUT", help="directory for config.json + model.safetensors"
    )
    parser.add_argument("--checkpoint", type=int, default=None, metavar="STEP", help="default: the latest complete one")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    args = parser.parse_args(argv)
    try:
        out = to_hf_dir(args.run_dir, args.to_hf, args.checkpoint, args.dtype, args.overwrite)
    except (ValueError, ConfigError) as e:  # RunError, ConvertError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0
