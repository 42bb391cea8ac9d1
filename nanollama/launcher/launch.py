"""From a parsed launch to a submitted one: check, resolve the tasks, write the layout, submit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nanollama.config import ConfigError
from nanollama.launcher import grid, layout, scripts
from nanollama.launcher.spec import Launch


@dataclass
class Prepared:
    log_dir: Path
    script: Path  # run.sh
    tasks: list[grid.Task]
    command: list[str]  # what submits (slurm) or runs (bash) run.sh


def prepare(launch: Launch, dry_run: bool = False, python: str = sys.executable) -> Prepared:
    """Everything up to submission. Checks come first, so a refused launch writes nothing."""
    cfg = launch.cfg
    if cfg.launcher == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise ConfigError(
            "launcher.launcher", "slurm needs sbatch, which is not on this machine; use launcher=bash to run here"
        )
    layout.check_script(cfg.script)
    log_dir = Path(cfg.log_dir).expanduser().resolve()
    cfg.log_dir = str(log_dir)  # launcher.yaml records where it really went
    tasks = grid.resolve(launch.run, cfg.grid, launch.run_class, log_dir)
    layout.prepare(log_dir, cfg.overwrite, dry_run)
    text = scripts.render(cfg, len(tasks), log_dir, python)
    script = layout.write(launch, tasks, log_dir, text)
    command = ["sbatch", "--parsable", str(script)] if cfg.launcher == "slurm" else ["bash", str(script)]
    return Prepared(log_dir=log_dir, script=script, tasks=tasks, command=command)


def summary(p: Prepared) -> str:
    lines = [f"{len(p.tasks)} task(s) in {p.log_dir}"]
    for t in p.tasks[:20]:
        lines.append(f"  task {t.id}: {grid.describe(t.point)}")
    if len(p.tasks) > 20:
        lines.append(f"  ... ({len(p.tasks) - 20} more in {p.log_dir / 'tasks.jsonl'})")
    return "\n".join(lines)


def submit_slurm(p: Prepared) -> str:
    """sbatch run.sh; returns the job id."""
    res = subprocess.run(p.command, capture_output=True, text=True)
    if res.returncode != 0:
        message = (res.stderr or res.stdout).strip().splitlines()
        raise ConfigError("launcher.slurm", f"sbatch refused the job: {message[-1] if message else res.returncode}")
    return res.stdout.strip().split(";")[0]


def run_bash(p: Prepared) -> None:
    """Become `bash run.sh` (exec), so Ctrl-C and signals reach it and its task as if typed by hand."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(p.command[0], p.command)
