"""Grid expansion: the cartesian product of the grid's value lists, one fully resolved config per task."""

from __future__ import annotations

import copy
import itertools
import json
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


def point_key(point: dict[str, Any]) -> str:
    """A grid point as canonical JSON: what identifies a task across launches into one log directory."""
    return json.dumps(json.loads(json.dumps(point)), sort_keys=True)


def assign_ids(points: list[dict[str, Any]], known: dict[str, int] | None = None) -> list[int]:
    """Task ids: a point already in the log directory (`known`: point_key -> id) keeps its id; new
    points take the next free ids in grid order. Without `known`, ids are grid positions 0..N-1."""
    known = known or {}
    free = max(known.values(), default=-1) + 1
    ids = []
    for point in points:
        key = point_key(point)
        if key not in known:
            known = {**known, key: free}
            free += 1
        ids.append(known[key])
    return ids


def resolve(
    run: dict, grid: dict[str, list], run_class: type | None, log_dir: Path, known: dict[str, int] | None = None
) -> list[Task]:
    """The tasks of a launch: base run config + one grid point each, run_dir = log_dir/runs/{id}/, validated.

    `known` (point_key -> id, from an existing log directory) keeps the ids, and so the run
    directories, of points launched before (see assign_ids).
    """
    check_keys(run, grid, run_class)
    resolved = []
    for i, point in enumerate(expand(grid)):
        data = copy.deepcopy(run)
        for key, value in point.items():
            _set(data, key, value, run_class)
        data["run_dir"] = str((log_dir / "runs" / str(i)).resolve())  # validated as any path; the id comes below
        if run_class is not None:
            try:
                data = config.to_dict(config.build(run_class, data))
            except ConfigError as e:
                raise ConfigError(
                    f"run.{e.field}" if e.field else "run", f"{e.reason} (task {i}: {describe(point)})"
                ) from None
            point = {key: _get(data, key) for key in point}  # as typed by the config ("1e-3" -> 0.001)
        resolved.append((point, data))
    tasks = []
    for (point, data), task_id in zip(resolved, assign_ids([p for p, _ in resolved], known)):
        run_dir = (log_dir / "runs" / str(task_id)).resolve()
        data["run_dir"] = str(run_dir)
        text = f"# task {task_id}: {describe(point)}\n" + yaml.safe_dump(data, sort_keys=False)
        tasks.append(Task(id=task_id, point=point, run_dir=run_dir, text=text))
    return tasks
