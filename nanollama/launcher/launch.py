"""From a parsed launch to a submitted one: check, resolve the tasks, write the layout, submit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nanollama.config import ConfigError
from nanollama.launcher import extend, grid, layout, scripts
from nanollama.launcher.spec import Launch


@dataclass
class Prepared:
    log_dir: Path
    script: Path  # run.sh
    tasks: list[grid.Task]
    command: list[str]  # what submits (slurm) or runs (bash) run.sh
    staged: layout.Staged | extend.Extension  # kept once submitted; undone if sbatch refuses
    run_ids: list[int] | None = None  # an extended launch: the tasks it runs (None: all)
    states: dict[int, str] = field(default_factory=dict)  # an extended launch: each task's state before it


def prepare(launch: Launch, dry_run: bool = False, python: str = sys.executable) -> Prepared:
    """Everything up to submission. Checks come first, so a refused launch writes nothing.

    A dry run is final here; a real one is final once `submit_slurm` or `run_bash` went through.
    """
    cfg = launch.cfg
    if cfg.launcher == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise ConfigError(
            "launcher.launcher", "slurm needs sbatch, which is not on this machine; use launcher=bash to run here"
        )
    layout.check_script(cfg.script)
    log_dir = Path(cfg.log_dir).expanduser().resolve()
    cfg.log_dir = str(log_dir)  # launcher.yaml records where it really went
    if cfg.extend and extend.can_extend(log_dir):
        return _prepare_extension(launch, log_dir, dry_run, python)
    tasks = grid.resolve(launch.run, cfg.grid, launch.run_class, log_dir)
    staged = layout.prepare(log_dir, cfg.overwrite, dry_run)
    try:
        text = scripts.render(cfg, len(tasks), log_dir, python)
        script = layout.write(launch, tasks, log_dir, text)
    except BaseException:  # a snapshot that fails (or Ctrl-C) half-way leaves nothing either
        staged.undo()
        raise
    if dry_run:
        staged.keep()
    command = ["sbatch", "--parsable", str(script)] if cfg.launcher == "slurm" else ["bash", str(script)]
    return Prepared(log_dir=log_dir, script=script, tasks=tasks, command=command, staged=staged)


def _prepare_extension(launch, log_dir: Path, dry_run: bool, python: str) -> Prepared:
    """The launch into an existing log directory (see extend.py). A dry run writes nothing."""
    cfg = launch.cfg
    index = extend.read_index(log_dir)
    tasks = grid.resolve(launch.run, cfg.grid, launch.run_class, log_dir, extend.known_ids(index))
    extend.check_unchanged(log_dir, tasks, index)
    run_ids, states = extend.pending(log_dir, tasks)
    n_index = len({*(int(e["id"]) for e in index), *(t.id for t in tasks)})
    if dry_run or not run_ids:  # nothing is written: a look, or every task of the grid is done already
        staged = extend.Extension(log_dir)
    else:
        text = scripts.render(cfg, n_index, log_dir, python, run_ids)
        staged = extend.write(log_dir, tasks, index, layout.launcher_text(launch, n_index), text)
    command = (
        ["sbatch", "--parsable", str(log_dir / "run.sh")]
        if cfg.launcher == "slurm"
        else ["bash", str(log_dir / "run.sh")]
    )
    return Prepared(log_dir, log_dir / "run.sh", tasks, command, staged, run_ids, states)


def summary(p: Prepared) -> str:
    if p.run_ids is not None:
        return _extension_summary(p)
    lines = [f"{len(p.tasks)} task(s) in {p.log_dir}"]
    for t in p.tasks[:20]:
        lines.append(f"  task {t.id}: {grid.describe(t.point)}")
    if len(p.tasks) > 20:
        lines.append(f"  ... ({len(p.tasks) - 20} more in {p.log_dir / 'tasks.jsonl'})")
    return "\n".join(lines)


def _extension_summary(p: Prepared) -> str:
    lines = [f"extending {p.log_dir}: {len(p.tasks)} task(s) in the grid, {len(p.run_ids)} to run"]
    for t in p.tasks[:20]:
        state = p.states.get(t.id, "pending")
        if t.id not in p.run_ids:
            what = f"{state}: skipped"
        else:
            what = "to run" if state == "pending" else f"{state}: resumes"
        lines.append(f"  task {t.id}: {grid.describe(t.point)}  ({what})")
    if len(p.tasks) > 20:
        lines.append(f"  ... ({len(p.tasks) - 20} more in {p.log_dir / 'tasks.jsonl'})")
    return "\n".join(lines)


def submit_slurm(p: Prepared) -> str:
    """sbatch run.sh; returns the job id. A refusal removes the log directory (and restores the one it replaced)."""
    try:
        res = subprocess.run(p.command, capture_output=True, text=True)
    except BaseException:
        p.staged.undo()
        raise
    if res.returncode != 0:
        p.staged.undo()
        message = (res.stderr or res.stdout).strip().splitlines()
        reason = message[-1] if message else f"exit code {res.returncode}"
        raise ConfigError("launcher.slurm", f"sbatch refused the job ({reason}); nothing was written")
    job = res.stdout.strip().split(";")[0]
    p.staged.keep()
    layout.mark_submitted(p.log_dir, f"slurm job {job}")
    return job


def run_bash(p: Prepared) -> None:
    """Become `bash run.sh` (exec), so Ctrl-C and signals reach it and its task as if typed by hand.

    run.sh marks the directory submitted itself (it may also be run by hand, after a dry run).
    """
    p.staged.keep()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(p.command[0], p.command)
