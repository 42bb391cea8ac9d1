"""The log directory of a launch.

log_dir/
  launcher.yaml     the launch as resolved (launcher section + base run config)
  tasks.jsonl       one line per task: id, grid values, run_dir
  tasks/{id}.yaml   each task's fully resolved training config
  code/             the package source at launch (+ git.txt, git.diff); tasks import it via PYTHONPATH
  run.sh            the exact script submitted (sbatch) or run (bash)
  stdout/{id}.out   each task's output, every attempt appended
  runs/{id}/        each task's run directory (config.yaml, metrics.jsonl, train.log, checkpoints/)
  SUBMITTED         written once the tasks were handed to sbatch or started by run.sh (status's "pending")
  DRY_RUN           written by --dry-run (nothing ran: the next launch may replace the directory)
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanollama import config
from nanollama.config import ConfigError
from nanollama.launcher.grid import Task
from nanollama.launcher.spec import Launch
from nanollama.utils.fileio import write_atomic

# What marks a directory as ours, so `overwrite` never deletes anything else.
MARKERS = ("launcher.yaml", "run.sh")
# Left by --dry-run: such a directory ran nothing, so the real launch may replace it without `overwrite`.
DRY_RUN = "DRY_RUN"
# Written when the tasks really were submitted (by the launcher after sbatch, or by run.sh when it starts):
# without it, a task with no output was never submitted rather than pending.
SUBMITTED = "SUBMITTED"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


@dataclass
class Staged:
    """A new log directory until the launch goes through: `keep` it then, or `undo` it.

    The directory it replaced is only moved aside meanwhile, so a refused launch neither leaves its
    own files behind nor loses the old ones.
    """

    log_dir: Path
    aside: Path | None  # the directory it replaces, moved out of the way
    created: Path | None  # the outermost directory this launch created (log_dir, or a parent such as logs/)

    def keep(self) -> None:
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def undo(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        else:  # an empty directory that was there before is the user's: leave it, empty
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir.mkdir()
        if self.aside is not None:
            (self.aside / self.log_dir.name).rename(self.log_dir)
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None


def prepare(log_dir: Path, overwrite: bool, dry_run: bool = False) -> Staged:
    """Create an empty log directory; an existing one is refused unless `overwrite` (and it is a launcher's).

    A directory left by a dry run is replaced without `overwrite`: nothing ran in it.
    """
    aside = None
    if log_dir.exists() and any(log_dir.iterdir()):
        if not overwrite and not (log_dir / DRY_RUN).exists():
            raise ConfigError(
                "launcher.log_dir",
                f"{log_dir} already exists; pass overwrite=true to replace it, extend=true to add grid points "
                "and resume its unfinished tasks, or choose another name/log_dir",
            )
        if not any((log_dir / m).exists() for m in MARKERS):
            raise ConfigError("launcher.log_dir", f"{log_dir} exists and is not a launcher log directory: not deleting")
        aside = Path(tempfile.mkdtemp(prefix=f".{log_dir.name}.replaced.", dir=log_dir.parent))
        log_dir.rename(aside / log_dir.name)
    missing = [d for d in (log_dir, *log_dir.parents) if not d.exists()]
    staged = Staged(log_dir, aside, created=missing[-1] if missing else None)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("tasks", "stdout", "runs", "code"):
            (log_dir / sub).mkdir()
        if dry_run:
            (log_dir / DRY_RUN).write_text("written by --dry-run: the next real launch replaces this directory\n")
    except BaseException:
        staged.undo()
        raise
    return staged


def mark_submitted(log_dir: Path, what: str) -> None:
    """Record that the tasks were handed over (what: the job id or the command), so status shows them pending."""
    write_atomic(log_dir / SUBMITTED, what.rstrip("\n") + "\n")
    (log_dir / DRY_RUN).unlink(missing_ok=True)


def source_roots(script: str) -> list[Path]:
    """The top-level packages (or modules) the tasks import: nanollama, and the script's own package."""
    roots = []
    for top in dict.fromkeys(["nanollama", script.split(".")[0]]):
        spec = importlib.util.find_spec(top)
        if spec is None:
            raise ConfigError("launcher.script", f"cannot find the module {top!r} from here")
        if spec.submodule_search_locations:
            roots.append(Path(next(iter(spec.submodule_search_locations))))
        elif spec.origin and spec.origin.endswith(".py"):
            roots.append(Path(spec.origin))
    return roots


def check_script(script: str) -> None:
    try:
        found = importlib.util.find_spec(script) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError("launcher.script", f"no module {script!r} can be imported here")


def snapshot(code_dir: Path, script: str) -> None:
    """Copy the source the tasks run, and record the git state of its checkout (commit, status, diff)."""
    for root in source_roots(script):
        if root.is_dir():
            shutil.copytree(root, code_dir / root.name, ignore=_IGNORE)
        else:
            shutil.copy2(root, code_dir / root.name)
        _record_git(root if root.is_dir() else root.parent, code_dir, root.name)


def _git(cwd: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def _record_git(where: Path, code_dir: Path, name: str) -> None:
    top = _git(where, "rev-parse", "--show-toplevel")
    if top is None:
        return
    commit = (_git(where, "rev-parse", "HEAD") or "(no commit yet)").strip()
    branch = (_git(where, "rev-parse", "--abbrev-ref", "HEAD") or "").strip()
    status = _git(where, "status", "--short") or ""
    info = f"repository: {top.strip()}\ncommit: {commit}\nbranch: {branch}\nstatus:\n{status}"
    suffix = "" if name == "nanollama" else f".{name}"
    (code_dir / f"git{suffix}.txt").write_text(info)
    (code_dir / f"git{suffix}.diff").write_text(_git(where, "diff", "HEAD") or "")


def launcher_text(launch: Launch, n_tasks: int) -> str:
    """launcher.yaml: the launch as resolved (launcher section + base run config)."""
    resolved = {"launcher": config.to_dict(launch.cfg), "run": launch.run}
    header = f"# resolved launch ({n_tasks} tasks); run config from {launch.run_source}\n"
    return header + yaml.safe_dump(resolved, sort_keys=False)


def write(launch: Launch, tasks: list[Task], log_dir: Path, script_text: str) -> Path:
    """Write the whole layout (the log directory must have been prepared); returns run.sh."""
    cfg = launch.cfg
    snapshot(log_dir / "code", cfg.script)
    for task in tasks:
        write_atomic(log_dir / "tasks" / f"{task.id}.yaml", task.text)
    index = [json.dumps({"id": t.id, "grid": t.point, "run_dir": str(t.run_dir)}) for t in tasks]
    (log_dir / "tasks.jsonl").write_text("\n".join(index) + "\n")
    (log_dir / "launcher.yaml").write_text(launcher_text(launch, len(tasks)))
    script = log_dir / "run.sh"
    script.write_text(script_text)
    script.chmod(0o755)
    return script
