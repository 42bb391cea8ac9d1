"""`python -m nanollama.launcher.status LOG_DIR`: one line per task of a launch, from its files alone.

State comes from the last `[launcher]` line of stdout/{id}.out (written by run.sh): no output yet is
`pending` once the launch was submitted (log_dir/SUBMITTED) and `not submitted` before that (a dry
run, or a launch that never reached sbatch or run.sh), a started attempt without an exit line
`running`, then `done` (exit 0), `preempted` (75: checkpointed, requeued or to be relaunched),
`interrupted` (130) or `failed (N)`. Progress
and losses come from runs/{id}/metrics.jsonl. Works for Slurm and bash launches alike, and needs
no Slurm command.

`--watch [SECONDS]` (default 10) redraws the table in place every SECONDS until every task has
finished (done or failed), or until Ctrl-C (exit 0). A preempted task is not finished: Slurm
requeues it, and under bash the next `run.sh` resumes it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import yaml

from nanollama.launcher.layout import DRY_RUN, SUBMITTED
from nanollama.observe.metrics import read_records
from nanollama.train.progress import format_eta
from nanollama.utils.exit_codes import NAMES

_EXIT = re.compile(r"^\[launcher\] task \d+: exit code (\d+)")
# A new attempt (a requeue, or run.sh run again): Slurm's "job 9_1 (id 10), attempt 2, host", bash's "attempt at".
# Not "requeueing ...; the next attempt resumes": that task is still preempted until it starts again.
_ATTEMPT = re.compile(r"^\[launcher\] task \d+: (job \S+ \(id \S+\), attempt \d+|attempt )")
NOT_SUBMITTED = "not submitted"
FINISHED = ("done", "failed")  # states no later attempt changes unless relaunched by hand


def task_state(stdout: Path, submitted: bool = True) -> str:
    if not stdout.exists():
        return "pending" if submitted else NOT_SUBMITTED
    state = "running"
    for line in stdout.read_text(errors="replace").splitlines():
        if not line.startswith("[launcher] task "):
            continue
        match = _EXIT.match(line)
        if match:
            code = int(match.group(1))
            state = NAMES.get(code, f"failed ({code})")
        elif _ATTEMPT.match(line):
            state = "running"  # a new attempt (a requeue, or run.sh run again) after an exit
    return state


def rows(log_dir: Path) -> list[dict]:
    """One dict per task: id, grid, state, step, steps, eta_s, loss, eval_loss, excess_loss, run_dir.

    eta_s is the trainer's estimate at its last log step, for a running task only (None otherwise).
    """
    index = log_dir / "tasks.jsonl"
    if not index.exists():
        raise FileNotFoundError(f"{log_dir} is not a launcher log directory (no tasks.jsonl)")
    # launches from before the SUBMITTED marker have neither it nor DRY_RUN: they were submitted
    submitted = (log_dir / SUBMITTED).exists() or not (log_dir / DRY_RUN).exists()
    out = []
    for line in index.read_text().splitlines():
        task = json.loads(line)
        run_dir = Path(task["run_dir"])
        config = yaml.safe_load((log_dir / "tasks" / f"{task['id']}.yaml").read_text()) or {}
        records = read_records(run_dir / "metrics.jsonl")
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        state = task_state(log_dir / "stdout" / f"{task['id']}.out", submitted)
        out.append(
            {
                "id": task["id"],
                "grid": task["grid"],
                "state": state,
                "step": train[-1]["step"] if train else 0,
                "steps": config.get("steps"),
                "eta_s": train[-1].get("eta_s") if train and state == "running" else None,
                "loss": train[-1]["loss"] if train else None,
                "eval_loss": evals[-1]["eval_loss"] if evals else None,
                "excess_loss": evals[-1].get("excess_loss") if evals else None,
                "run_dir": str(run_dir),
            }
        )
    return out


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(log_dir: Path, data: list[dict] | None = None) -> str:
    data = rows(log_dir) if data is None else data
    grids = [" ".join(f"{k}={v}" for k, v in r["grid"].items()) or "-" for r in data]
    width = max([4, *map(len, grids)])
    lines = [
        f"{'task':>4}  {'grid':<{width}}  {'state':<13} {'step':>13}  {'eta':>6}  {'loss':>8}  {'eval_loss':>9}  "
        f"{'excess':>8}"
    ]
    for r, grid in zip(data, grids):
        step = f"{r['step']}/{r['steps'] if r['steps'] is not None else '?'}"
        eta = format_eta(r["eta_s"]) if r["state"] == "running" else "-"
        lines.append(
            f"{r['id']:>4}  {grid:<{width}}  {r['state']:<13} {step:>13}  {eta:>6}  {_fmt(r['loss']):>8}  "
            f"{_fmt(r['eval_loss']):>9}  {_fmt(r['excess_loss']):>8}"
        )
    counts: dict[str, int] = {}
    for r in data:
        key = r["state"].split(" (")[0]  # "failed (3)" and "failed (1)" count together
        counts[key] = counts.get(key, 0) + 1
    lines.append(
        ", ".join(f"{n} {state}" for state, n in counts.items()) + f"  (metrics: {log_dir}/runs/ID/metrics.jsonl)"
    )
    return "\n".join(lines)


CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


def watch(
    log_dir: Path,
    every: float = 10.0,
    out: TextIO = sys.stdout,
    refreshes: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the table every `every` seconds until every task has finished (or `refreshes` draws); Ctrl-C: 0.

    On a terminal each draw clears the screen first; into a file or pipe the tables follow one another.
    """
    clear = CLEAR if out.isatty() else ""
    drawn = 0
    try:
        while True:
            data = rows(log_dir)
            finished = all(r["state"].split(" (")[0] in FINISHED for r in data)
            note = "all tasks finished" if finished else f"every {every:g}s; Ctrl-C to stop"
            out.write(f"{clear}{log_dir}  {time.strftime('%H:%M:%S')}  ({note})\n{table(log_dir, data)}\n")
            out.flush()
            drawn += 1
            if finished or (refreshes is not None and drawn >= refreshes):
                return 0
            sleep(every)
    except KeyboardInterrupt:
        out.write("\n")
        return 0


USAGE = "usage: python -m nanollama.launcher.status LOG_DIR [--watch [SECONDS]]"


def _parse(argv: list[str]) -> tuple[Path, float | None]:
    """(log_dir, watch interval or None); ValueError with the usage on anything else."""
    args = list(argv)
    every = None
    if "--watch" in args:
        i = args.index("--watch")
        every = 10.0
        if i + 1 < len(args) and not args[i + 1].startswith("-") and not Path(args[i + 1]).is_dir():
            try:
                every = float(args[i + 1])
            except ValueError:
                raise ValueError(f"--watch SECONDS must be a number, got {args[i + 1]!r}") from None
            if not every > 0:
                raise ValueError(f"--watch SECONDS must be > 0, got {args[i + 1]}")
            del args[i + 1]
        del args[i]
    if len(args) != 1 or args[0].startswith("-"):
        raise ValueError(USAGE)
    return Path(args[0]), every


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        log_dir, every = _parse(argv)
        if every is not None:
            return watch(log_dir, every)
        print(table(log_dir))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
