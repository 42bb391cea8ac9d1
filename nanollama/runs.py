"""A training run directory as the tools after training see it: its config and its latest weights.

run_dir/config.yaml              the resolved TrainConfig
run_dir/checkpoints/step_*/      complete checkpoints (see nanollama.train.checkpoint)
run_dir/metrics.jsonl            log steps and evaluations (nanollama.observe.metrics)
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanollama import config, models
from nanollama.train import checkpoint
from nanollama.train.config import TrainConfig


class RunError(ValueError):
    """A run directory that cannot be used (missing config or checkpoint): reported in one line, exit 2."""


def load_config(run_dir: str | Path) -> TrainConfig:
    """The run's resolved config; RunError when run_dir is not a training run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}")
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise RunError(f"no config.yaml in {run_dir} (is it a training run directory?)")
    if not cfg_path.read_bytes().strip():  # would read as the defaults: another model than the checkpoints'
        raise RunError(
            f"{cfg_path} is empty; relaunching the training command restores it from the latest checkpoint's copy"
        )
    return config.load(TrainConfig, cfg_path)


def latest_checkpoint(run_dir: str | Path) -> Path:
    path = checkpoint.latest(Path(run_dir) / "checkpoints")
    if path is None:
        raise RunError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA device is available")
    return device


def load_run(run_dir: str | Path, device: str | torch.device | None = None, path: str | Path | None = None):
    """(TrainConfig, model with a checkpoint's weights, in eval mode on `device`); the latest checkpoint by default."""
    cfg = load_config(run_dir)
    path = latest_checkpoint(run_dir) if path is None else Path(path)
    device = resolve_device(device)
    model = models.build(cfg.model)
    checkpoint.load_model(path, model)  # unsharded weights from the (possibly sharded) checkpoint
    return cfg, model.to(device).eval()
