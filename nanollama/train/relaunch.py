"""What a relaunch in an existing run directory may change, checked before anything is built, and the
record of what it did change.

run_dir/config.yaml              the resolved config of the latest launch (what the later tools read)
run_dir/configs/config.<n>.yaml  every distinct resolved config the run was launched with, n = 1, 2, ...
each checkpoint's train state    a copy of the resolved config ("config"), so that a lost config.yaml
                                 can be restored from the checkpoint it describes
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from nanollama import config
from nanollama.train import checkpoint
from nanollama.train.config import TrainConfig
from nanollama.utils.fileio import write_atomic

FROZEN = ("model", "data", "seed")  # what a checkpoint's weights and data position depend on
UNCHECKED = ("data.num_workers",)  # may change freely: the stream resumes exactly with any number
_HISTORY = re.compile(r"^config\.(\d+)\.yaml$")


def check_relaunch(cfg: TrainConfig, run_dir: Path) -> None:
    """Create run_dir, or check that a relaunch in it continues the same run.

    A relaunch may change steps, the optimizer, logging, evaluation, checkpointing and parallelism,
    but not the model, the data or the seed: the checkpoint would not fit (and the saved config,
    which generation and evaluation read, would no longer describe it). With checkpoints present,
    the run's config comes from config.yaml, or, when that is missing, empty or unreadable, from the
    latest checkpoint's copy (and the launch goes on only if it agrees; the trainer then rewrites
    config.yaml); without either the launch is refused.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise config.ConfigError("run_dir", f"cannot create {run_dir}: {e.strerror}") from None
    latest = checkpoint.latest(run_dir / "checkpoints")
    if latest is None:
        return
    saved, problem = read_saved(run_dir / "config.yaml")
    where = f"the run in {run_dir}"
    if saved is None:
        saved = checkpoint_config(latest)
        if saved is None:
            raise config.ConfigError(
                "run_dir",
                f"{run_dir} has checkpoints but its config.yaml is {problem}, and {latest.name} holds no copy "
                f"of the config: restore config.yaml (the run's resolved config) or use a new run_dir",
            )
        where = f"the run in {run_dir} ({latest.name}'s copy of its config; config.yaml is {problem})"
    fix = "use a new run_dir to change it" + ("" if not problem else ", or relaunch with it to restore config.yaml")
    new = config.to_dict(cfg)
    for key in FROZEN:
        diff = first_difference(saved.get(key), new.get(key), key)
        if diff is not None:
            path, old, now = diff
            raise config.ConfigError(path, f"is {_show(now)} but {where} was trained with {_show(old)}; {fix}")


def read_saved(path: Path) -> tuple[dict | None, str]:
    """(the saved resolved config as plain data, '') or (None, why not: 'missing', 'empty', 'unreadable: ...')."""
    if not path.is_file():
        return None, "missing"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({e})"
    if not text.strip():
        return None, "empty"
    try:
        return config.to_dict(config.load(TrainConfig, path)), ""
    except config.ConfigError as e:
        return None, f"unreadable ({e})"


def checkpoint_config(path: Path) -> dict | None:
    """The resolved config stored in checkpoint `path` (rank 0's train state), as plain data; None if absent."""
    try:
        state = torch.load(path / "train_state_rank0.pt", weights_only=False)
        text = state.get("config") if isinstance(state, dict) else None
        return config.to_dict(config.build(TrainConfig, config.parse_yaml(text))) if text else None
    except (OSError, RuntimeError, yaml.YAMLError, config.ConfigError):
        return None


def first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    """(dotted path, old, new) of the first leaf where two configs' plain data differ, else None."""
    if path in UNCHECKED:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            diff = first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if diff is not None:
                return diff
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        if len(old) != len(new):
            return (f"{path}", f"a list of {len(old)}", f"a list of {len(new)}")
        for i, (a, b) in enumerate(zip(old, new)):
            diff = first_difference(a, b, f"{path}.{i}")
            if diff is not None:
                return diff
        return None
    return None if old == new else (path, old, new)


def changes(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Every (dotted key, old, new) where two configs' plain data differ, in config order."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += changes(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changes(a, b, f"{path}.{i}")]
    return [] if old == new else [(path, old, new)]


def save_config(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Write run_dir/config.yaml, keep the history, and return what changed since the last launch.

    Each distinct resolved config is kept as run_dir/configs/config.<n>.yaml (the first launch's is
    config.1.yaml), so a value changed at a relaunch (say optim.lr) is never lost. The returned lines
    (to log) read 'changed at this relaunch: optim.lr: 0.003 -> 0.0005', or say that config.yaml was restored.
    """
    text = config.dump(cfg)
    new = config.to_dict(cfg)
    saved, problem = read_saved(run_dir / "config.yaml")
    history = run_dir / "configs"
    history.mkdir(exist_ok=True)
    numbers = sorted(int(m.group(1)) for p in history.iterdir() if (m := _HISTORY.match(p.name)))
    if not numbers and saved is not None:  # a run from before the history was kept: its config comes first
        write_atomic(history / "config.1.yaml", (run_dir / "config.yaml").read_text(encoding="utf-8"))
        numbers = [1]
    previous = saved
    if previous is None and numbers:  # config.yaml lost: compare with the last one kept
        previous, _ = read_saved(history / f"config.{numbers[-1]}.yaml")
    lines = []
    if saved is None and (numbers or checkpoint.latest(run_dir / "checkpoints") is not None):
        lines.append(f"config.yaml was {problem}: rewritten from this launch's config (it agrees with the checkpoint)")
    if previous is not None:
        lines += [f"changed at this relaunch: {key}: {_show(a)} -> {_show(b)}" for key, a, b in changes(previous, new)]
    if previous != new or not numbers:
        write_atomic(history / f"config.{(numbers[-1] if numbers else 0) + 1}.yaml", text)
    write_atomic(run_dir / "config.yaml", text)
    return lines


def _show(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)
