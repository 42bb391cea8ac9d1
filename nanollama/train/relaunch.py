"""What a relaunch in an existing run directory may change, checked before anything is built."""

from __future__ import annotations

from pathlib import Path

from nanollama import config
from nanollama.train import checkpoint
from nanollama.train.config import TrainConfig


def check_relaunch(cfg: TrainConfig, run_dir: Path) -> None:
    """Create run_dir, or check that a relaunch in it continues the same run.

    A relaunch may change steps, the optimizer, logging, evaluation, checkpointing and parallelism,
    but not the model, the data or the seed: the checkpoint would not fit (and the saved config,
    which generation and evaluation read, would no longer describe it).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config.ConfigError("run_dir", f"cannot create {run_dir}: {e.strerror}") from None
    saved_path = run_dir / "config.yaml"
    if checkpoint.latest(run_dir / "checkpoints") is None or not saved_path.is_file():
        return
    saved = config.to_dict(config.load(TrainConfig, saved_path))
    new = config.to_dict(cfg)
    for section in ("model", "data"):
        for key in sorted(set(saved[section]) | set(new[section])):
            if key != "num_workers" and saved[section].get(key) != new[section].get(key):
                raise config.ConfigError(
                    f"{section}.{key}",
                    f"is {new[section].get(key)!r} but the run in {run_dir} was trained with "
                    f"{saved[section].get(key)!r}; use a new run_dir to change it",
                )
    if saved["seed"] != new["seed"]:
        raise config.ConfigError("seed", f"is {new['seed']} but the run in {run_dir} used {saved['seed']}")
