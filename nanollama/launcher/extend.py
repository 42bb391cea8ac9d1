"""Relaunching into an existing log directory (`extend=true`): keep its tasks, add new grid points,
run only what is not done.

A task is known by its grid point (grid.point_key), so its id, and with it runs/{id}/ and
stdout/{id}.out, stays the same however the grid grows; new points take the next free ids. A task
that is done (status: its stdout's last exit line is 0) or diverged (exit 3) is left alone; every
other task of the new grid runs again, and the trainer resumes it from its checkpoint. Points of the old grid
that the new one leaves out stay in tasks.jsonl (status still shows them) but do not run. The code
snapshot of the first launch is kept, so old and new points run the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nanollama.config import ConfigError
from nanollama.launcher import status
from nanollama.launcher.grid import Task, point_key
from nanollama.launcher.layout import DRY_RUN, SUBMITTED
from nanollama.utils.exit_codes import NONFINITE
from nanollama.utils.fileio import write_atomic

# Not run again: done, and diverged (NaN loss), which a resume from its last good checkpoint would repeat.
SKIPPED = ("done", f"failed ({NONFINITE})")
# The files an extension rewrites: saved first, so a refused submission can put them back.
_REWRITTEN = ("tasks.jsonl", "launcher.yaml", "run.sh")


def can_extend(log_dir: Path) -> bool:
    """A log directory a real launch wrote (a dry run's is simply replaced, as without extend)."""
    return (log_dir / "tasks.jsonl").is_file() and not (log_dir / DRY_RUN).exists()


def read_index(log_dir: Path) -> list[dict]:
    """tasks.jsonl's entries ({id, grid, run_dir}); ConfigError naming the file when it is not readable."""
    path = log_dir / "tasks.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(
            "launcher.extend", f"cannot read {path} ({e}); relaunch with overwrite=true instead"
        ) from None


def known_ids(index: list[dict]) -> dict[str, int]:
    return {point_key(entry["grid"]): int(entry["id"]) for entry in index}


def _first_difference(old, new, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def check_unchanged(log_dir: Path, tasks: list[Task], index: list[dict]) -> None:
    """An existing task must resolve to the config it ran with: resuming a run with another one would mix two."""
    ids = {int(entry["id"]) for entry in index}
    for task in tasks:
        path = log_dir / "tasks" / f"{task.id}.yaml"
        if task.id not in ids or not path.is_file():
            continue
        old, new = yaml.safe_load(path.read_text()) or {}, yaml.safe_load(task.text) or {}
        diff = _first_difference(old, new)
        if diff is not None:
            raise ConfigError(
                "launcher.extend",
                f"task {task.id} ({path}) ran with another config ({diff}); extend with the same run config, "
                "or launch into a new log_dir",
            )


def pending(log_dir: Path, tasks: list[Task]) -> tuple[list[int], dict[int, str]]:
    """(ids of the tasks to run, ascending; each task's state now). Done and diverged tasks are skipped."""
    submitted = (log_dir / SUBMITTED).exists()
    states = {t.id: status.task_state(log_dir / "stdout" / f"{t.id}.out", submitted) for t in tasks}
    return sorted(i for i, s in states.items() if s not in SKIPPED), states


@dataclass
class Extension:
    """The rewritten index files of an extended log directory until the launch goes through (as layout.Staged)."""

    log_dir: Path
    saved: dict[str, bytes | None] = field(default_factory=dict)  # file name -> old content (None: absent)
    created: list[Path] = field(default_factory=list)  # new task configs

    def keep(self) -> None:
        self.saved, self.created = {}, []

    def undo(self) -> None:
        for name, content in self.saved.items():
            path = self.log_dir / name
            if content is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, content.decode())
        for path in self.created:
            path.unlink(missing_ok=True)
        self.keep()


def write(log_dir: Path, tasks: list[Task], index: list[dict], launcher_yaml: str, script_text: str) -> Extension:
    """Write the new tasks' configs and the union index (old entries the new grid leaves out stay), launcher.yaml
    and run.sh; the old files are saved in the returned Extension first."""
    ext = Extension(log_dir)
    for name in _REWRITTEN:
        path = log_dir / name
        ext.saved[name] = path.read_bytes() if path.exists() else None
    try:
        old_ids = {int(entry["id"]) for entry in index}
        for task in tasks:
            path = log_dir / "tasks" / f"{task.id}.yaml"
            if task.id not in old_ids or not path.exists():
                ext.created.append(path)
                write_atomic(path, task.text)
        entries = {int(e["id"]): e for e in index}
        entries.update({t.id: {"id": t.id, "grid": t.point, "run_dir": str(t.run_dir)} for t in tasks})
        write_atomic(log_dir / "tasks.jsonl", "".join(json.dumps(entries[i]) + "\n" for i in sorted(entries)))
        write_atomic(log_dir / "launcher.yaml", launcher_yaml)
        write_atomic(log_dir / "run.sh", script_text)
        (log_dir / "run.sh").chmod(0o755)
    except BaseException:
        ext.undo()
        raise
    return ext
