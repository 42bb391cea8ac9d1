"""`python -m nanollama.launcher CONFIG [key=value ...] [--dry-run]`: launch a grid on Slurm or here.

Exit codes: 0 submitted (slurm) or all tasks done (bash: the exit code of run.sh otherwise), 2 a bad
launch (one line naming the field, nothing written).
"""

from __future__ import annotations

import sys

from nanollama.config import ConfigError
from nanollama.launcher import launch, spec


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(spec.USAGE)
        return 0
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    try:
        if any(a.startswith("-") for a in argv):
            bad = next(a for a in argv if a.startswith("-"))
            raise ConfigError("", f"unknown option {bad}\n{spec.USAGE}")
        prepared = launch.prepare(spec.parse(argv), dry_run=dry_run)
        print(launch.summary(prepared))
        if prepared.run_ids == []:  # an extension of a sweep whose tasks are all done
            print(f"nothing to run: every task of the grid is done in {prepared.log_dir}")
            return 0
        if dry_run:
            print("dry run: would run  " + " ".join(prepared.command))
            return 0
        if prepared.command[0] == "sbatch":
            job = launch.submit_slurm(prepared)
            print(f"submitted job {job}: watch with  squeue -j {job}  and  tail -f {prepared.log_dir}/stdout/0.out")
            print(f"metrics: {prepared.log_dir}/runs/{{id}}/metrics.jsonl")
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch.run_bash(prepared)  # does not return
    return 1


if __name__ == "__main__":
    sys.exit(main())
