"""Launch training grids on Slurm (one sbatch array job, requeued on preemption) or on this machine (bash).

`python -m nanollama.launcher CONFIG [key=value ...] [--dry-run]`; see docs/launcher.md.
Modules: spec (the config and command line), grid (tasks), layout (the log directory and code
snapshot), scripts (run.sh), launch (submission), status (`python -m nanollama.launcher.status LOG_DIR`).
"""

from nanollama.launcher.spec import LauncherConfig, SlurmConfig, parse

__all__ = ["LauncherConfig", "SlurmConfig", "parse"]
