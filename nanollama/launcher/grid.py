"""Grid expansion: the cartesian product of the grid's value lists, one fully resolved config per task."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nanollama import config
from nanollama.config import ConfigError
from nanollama.launcher.spec import set_plain


@dataclass
class Task:
    id: int
    point: dict[str, Any]  # this task's grid values, by dotted key
    run_dir: Path
    text: str  # the task's resolved config as YAML (what tasks/{id}.yaml holds)


def expand(grid: dict[str, list]) -> list[dict[str, Any]]:
    """All combinations, the first key varying slowest; an empty grid is one task with no overrides."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def describe(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "(no grid)"


def _as_raw(value: Any) -> str:
    """A grid value as the YAML text `apply_override` parses back into the same value."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _set(data: dict, key: str, value: Any, run_class: type | None) -> None:
    if run_class is None:
        set_plain(data, key, value, must_exist=True)
    else:
        config.apply_override(data, key, _as_raw(value), run_class)


def _get(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def check_keys(run: dict, grid: dict[str, list], run_class: type | None) -> None:
    """Every grid key must name a field of the run config: fail on the first that does not, naming it."""
    for key, values in grid.items():
        try:
            _set(copy.deepcopy(run), key, values[0], run_class)
        except ConfigError as e:
            raise ConfigError(f"launcher.grid.{key}", f"is not a key of the run config ({e})") from None


def resolve(run: dict, grid: dict[str, list], run_class: type | None, log_dir: Path) -> list[Task]:
    """The tasks of a launch: base run config + one grid point each, run_dir = log_dir/runs/{id}/, validated."""
    check_keys(run, grid, run_class)
    tasks = []
    for i, point in enumerate(expand(grid)):
        data = copy.deepcopy(run)
        for key, value in point.items():
            _set(data, key, value, run_class)
        run_dir = (log_dir / "runs" / str(i)).resolve()
        data["run_dir"] = str(run_dir)
        if run_class is None:
            text = yaml.safe_dump(data, sort_keys=False)
        else:
            try:
                resolved = config.to_dict(config.build(run_class, data))
            except ConfigError as e:
                raise ConfigError(
                    f"run.{e.field}" if e.field else "run", f"{e.reason} (task {i}: {describe(point)})"
                ) from None
            text = yaml.safe_dump(resolved, sort_keys=False)
            point = {key: _get(resolved, key) for key in point}  # as typed by the config ("1e-3" -> 0.001)
        header = f"# task {i}: {describe(point)}\n"
        tasks.append(Task(id=i, point=point, run_dir=run_dir, text=header + text))
    return tasks
