"""The run.sh of a launch: an sbatch array script (slurm) or a sequential loop (bash).

Both run each task as `python -m SCRIPT tasks/{id}.yaml` from inside the log directory with
PYTHONPATH=log_dir/code first, so the tasks import the snapshot taken at launch, never the source
tree it came from (`python -m` puts the working directory first on sys.path, hence the cd).

Stopping (every form): SIGTERM or SIGUSR1 to run.sh (the batch script, or `bash run.sh`) reaches
every training process, which finishes its step, checkpoints and exits 75; run.sh waits for all of
them and exits 75 too, leaving no process behind. The training processes start with USR1 ignored
until the trainer installs its handler, and run.sh re-sends USR1 every second until they have
exited: a signal that lands during start-up is not lost, and one that lands after the trainer has
restored its handlers cannot kill it. torchrun itself is never signalled: it dies of USR1 (leaving
its workers running) and gives them only 30 s after a TERM, so under torchrun both signals reach
the workers as USR1 (bash: sent to torchrun's children; Slurm: srun delivers it to every process
of the step, and torchrun ignores it). torchrun exits 1 whenever a worker failed, whatever its
code: after a stop, run.sh reads the workers' own codes from torchrun's failure report.

Preemption (slurm): sbatch --signal=B:USR1@signal_time delivers USR1 to the batch script, which
runs the task in the background and waits, so its trap runs at once; after the task exits 75 the
script requeues its own array task, and the relaunch resumes from the checkpoint. A plain SIGTERM
(scancel, or a preemption the cluster requeues itself) stops the task the same way but is never
requeued by the script, so `scancel` still cancels.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from nanollama.launcher.layout import DRY_RUN, SUBMITTED
from nanollama.launcher.spec import LauncherConfig
from nanollama.utils.exit_codes import INTERRUPTED, PREEMPTED
from nanollama.utils.slurm import PORT_SHELL


def _preamble(log_dir: Path, python: str) -> str:
    return f"""set -u
LOG_DIR={shlex.quote(str(log_dir))}
export NANOLLAMA_PYTHON={shlex.quote(python)}
# Import the code snapshot taken at launch, not the source tree (cd: python -m puts the cwd first).
export PYTHONPATH="$LOG_DIR/code${{PYTHONPATH:+:$PYTHONPATH}}"
cd "$LOG_DIR" || exit 1
# Running makes it a real launch (also when run by hand after a dry run): status then shows tasks
# without output as pending, and the next launch no longer replaces this directory unasked.
[ -e {SUBMITTED} ] || echo "run.sh started at $(date '+%F %T') on $(hostname)" > {SUBMITTED}
rm -f {DRY_RUN}
"""


def task_command(cfg: LauncherConfig, slurm: bool) -> str:
    """The shell command that runs task $TASK (one line, for the scripts below).

    Every training process starts with USR1 ignored (see the module docstring); the bash script's
    subshell sets that for its own child.
    """
    module = f"-m {cfg.script} tasks/$TASK.yaml"
    if not cfg.torchrun:
        if slurm:  # one process per Slurm task: nodes x procs_per_node of them, from the sbatch lines
            inner = f'trap "" USR1; exec "$NANOLLAMA_PYTHON" -u {module}'
            return f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}"
        return f'"$NANOLLAMA_PYTHON" -u {module}'
    nproc = cfg.procs_per_node
    if not slurm:
        torchrun = '"$NANOLLAMA_PYTHON" -u -m torch.distributed.run'
        return f"{torchrun} --standalone --nnodes=1 --nproc-per-node={nproc} {module}"
    # One torchrun per node; they meet at a c10d rendezvous on the allocation's first node. USR1 is
    # ignored by torchrun itself (its default action would kill it) and handled by the trainers, which
    # install their own handler; srun signals every process of the step.
    inner = (
        'trap "" USR1; exec "$NANOLLAMA_PYTHON" -u -m torch.distributed.run'
        f" --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node={nproc}"
        ' --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"'
        f" {module}"
    )
    return f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}"


def array_indices(ids: list[int]) -> str:
    """Task ids as sbatch --array indices, runs of consecutive ids as ranges: [0, 1, 2, 5, 7, 8] -> 0-2,5,7-8."""
    parts: list[str] = []
    ids = sorted(ids)
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def sbatch_lines(cfg: LauncherConfig, n_tasks: int, log_dir: Path, ids: list[int] | None = None) -> list[str]:
    """ids: the array's task ids (an extended launch runs only its pending tasks); None: 0..n_tasks-1."""
    s = cfg.slurm
    array = (f"0-{n_tasks - 1}" if ids is None else array_indices(ids)) + (
        f"%{s.max_parallel}" if s.max_parallel else ""
    )
    lines = [
        f"--job-name={cfg.name}",
        f"--array={array}",
        f"--output={log_dir}/stdout/%a.out",
        "--open-mode=append",  # a requeued attempt appends to the same file
        f"--nodes={cfg.nodes}",
        f"--ntasks-per-node={1 if cfg.torchrun else cfg.procs_per_node}",
        f"--signal=B:USR1@{s.signal_time}",
        "--requeue",
    ]
    if s.gpus is not None:
        lines.append(f"--gpus-per-node={s.gpus}")
    elif cfg.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={cfg.gpus_per_node}")
    optional = {
        "partition": s.partition,
        "time": s.time,
        "mem": s.mem,
        "cpus-per-task": s.cpus_per_task,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
        "exclude": s.exclude,
    }
    lines += [f"--{k}={v}" for k, v in optional.items() if v is not None]
    lines += [line.strip().removeprefix("#SBATCH").strip() for line in s.extra]
    return lines


def _stopping(cfg: LauncherConfig, slurm: bool) -> str:
    """Shell functions both scripts share: the signal traps' actions, and waiting for the task ($child)."""
    if cfg.torchrun and not slurm:
        send = f"""# torchrun's workers are its children; torchrun itself is left alone (see {__name__}).
send() {{
    local f stat rest
    for f in /proc/[0-9]*/stat; do
        {{ read -r stat < "$f"; }} 2>/dev/null || continue
        rest=${{stat##*) }}  # after the command name, which may hold spaces and parentheses
        rest=${{rest#* }}
        [ "${{rest%% *}}" = "$child" ] || continue  # the parent pid
        f=${{f#/proc/}}
        kill "-$1" "${{f%/stat}}" 2>/dev/null
    done
}}"""
    else:  # the task itself; under Slurm that is srun, which relays the signal to every process of the step
        send = 'send() { kill "-$1" "$child" 2>/dev/null; }'
    if cfg.torchrun:  # a TERM goes on as USR1 too: torchrun must see neither
        act = "resend=1"
    else:  # USR1 is re-sent (see above); a TERM is sent once: it kills a trainer whose handler is gone
        act = 'if [ "$1" = USR1 ]; then resend=1; else sendterm=1; [ -n "$child" ] && send TERM && sendterm=0; fi'
    return f"""stop=0  # the exit code a signal asks for: {PREEMPTED} (TERM, USR1) or {INTERRUPTED} (INT, bash)
resend=0  # 1: USR1 goes to the training processes every second until they have exited
sendterm=0  # 1: a TERM came before the task started: send it once the task is there
child=
{send}
on_stop() {{  # $1: TERM | USR1
    stop={PREEMPTED}
    echo "[launcher] task $TASK: $1 at $(date '+%F %T'): asking the task to checkpoint and stop"
    {act}
}}
# Until the task has exited, re-sending USR1 while a stop is asked for; its exit code in rc.
wait_task() {{
    local sleeper ticks=0
    [ "$sendterm" = 1 ] && send TERM
    while kill -0 "$child" 2>/dev/null; do
        [ "$resend" = 1 ] && send USR1
        sleep 1 &
        sleeper=$!
        wait "$sleeper" || kill "$sleeper" 2>/dev/null  # wait returns at once when a trap runs
        ticks=$((ticks + 1))
        [ "$PROGRESS_EVERY" -gt 0 ] && [ $((ticks % PROGRESS_EVERY)) = 0 ] && progress
    done
    wait "$child"
    rc=$?
}}
{_torchrun_rc() if cfg.torchrun else ""}"""


def _torchrun_rc() -> str:
    return """# torchrun exits 1 whenever a worker failed, whatever its code. After a stop, its failure report
# ("exitcode  : 75 (pid: ...)", one per failed worker; torchrun's own output since $from) says whether
# every worker stopped as asked (a worker killed by a signal is listed with a negative code). No report
# at all is not a clean stop either.
torchrun_rc() {
    [ "$rc" != 0 ] && [ "$stop" != 0 ] || return 0
    codes=$(tail -c "+$from" "stdout/$TASK.out" 2>/dev/null | grep -oE 'exitcode *: *-?[0-9]+')
    if [ -n "$codes" ] && ! printf '%s\\n' "$codes" | grep -qvE ": *$stop\\$"; then
        echo "[launcher] task $TASK: torchrun exited $rc, its workers $stop"
        rc=$stop
    fi
}
"""


def slurm_script(
    cfg: LauncherConfig, n_tasks: int, log_dir: Path, python: str = sys.executable, ids: list[int] | None = None
) -> str:
    """The sbatch array script: one array task per grid point (or per id of `ids`), requeued on USR1."""
    directives = "\n".join(f"#SBATCH {line}" for line in sbatch_lines(cfg, n_tasks, log_dir, ids))
    torchrun_env = ""
    if cfg.torchrun:
        torchrun_env = f"""export RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export RDZV_PORT={PORT_SHELL}
"""
    return f"""#!/bin/bash
# Generated by nanollama.launcher: {n_tasks} task(s) of {cfg.script}, submitted with `sbatch run.sh`.
# Resubmit some tasks: sbatch --array=3,5 run.sh (finished tasks return at once: they resume at their last step).
{directives}

{_preamble(log_dir, python)}export TASK=$SLURM_ARRAY_TASK_ID
attempt=$((${{SLURM_RESTART_COUNT:-0}} + 1))
echo "[launcher] task $TASK: job ${{SLURM_ARRAY_JOB_ID}}_$TASK (id $SLURM_JOB_ID), attempt $attempt, $(hostname)"
echo "[launcher] task $TASK: started at $(date '+%F %T')"
{torchrun_env}from=$(($(wc -c 2>/dev/null < "stdout/$TASK.out" || echo 0) + 1))  # this attempt's output starts here
PROGRESS_EVERY=0  # squeue and launcher.status follow a Slurm task; its log is stdout/$TASK.out
{_stopping(cfg, slurm=True)}
preempted=0  # USR1 (Slurm's warning before the time limit) requeues; TERM does not, so scancel cancels
trap 'preempted=1; on_stop USR1' USR1
trap 'on_stop TERM' TERM

{task_command(cfg, slurm=True)} &
child=$!
wait_task
{"torchrun_rc" if cfg.torchrun else ""}
echo "[launcher] task $TASK: exit code $rc at $(date '+%F %T')"
if [ "$preempted" = 1 ] && [ "$rc" = {PREEMPTED} ]; then
    echo "[launcher] task $TASK: requeueing ${{SLURM_ARRAY_JOB_ID}}_$TASK; the next attempt resumes from the checkpoint"
    scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_$TASK"
fi
exit "$rc"
"""


def _progress() -> str:
    return r"""# A running task's progress: its last logged step and loss (metrics.jsonl), else its last output line.
last_progress=
progress() {
    local line step loss
    line=$(tail -n 20 "runs/$TASK/metrics.jsonl" 2>/dev/null | grep '"loss": .*}$' | tail -n 1)
    if [ -n "$line" ]; then
        step=$(echo "$line" | sed -nE 's/.*"step": ([0-9]+).*/\1/p')
        loss=$(echo "$line" | sed -nE 's/.*"loss": ([-+0-9.eE]+|NaN|-?Infinity).*/\1/p')
        line="step $step${steps:+/$steps}, loss $loss"
    else
        line=$(tail -c "+$from" "stdout/$TASK.out" 2>/dev/null | grep -v '^\[launcher\]' | grep . | tail -n 1)
    fi
    [ -n "$line" ] && [ "$line" != "$last_progress" ] && echo "[launcher] task $TASK: $line ($(date '+%T'))"
    last_progress=$line
}
"""


def bash_script(
    cfg: LauncherConfig, n_tasks: int, log_dir: Path, python: str = sys.executable, ids: list[int] | None = None
) -> str:
    """The tasks (0..n_tasks-1, or `ids`) one after another here; rerunning the script resumes where it stopped."""
    loop = f"$(seq 0 {n_tasks - 1})" if ids is None else " ".join(map(str, ids))
    n_run = n_tasks if ids is None else len(ids)
    return f"""#!/bin/bash
# Generated by nanollama.launcher: {n_tasks} task(s) of {cfg.script}, one after another, with `bash run.sh`.
# Stopped (Ctrl-C, SIGTERM, SIGUSR1)? Run it again: every task resumes from its last checkpoint.
{_preamble(log_dir, python)}
TASK=-
PROGRESS_EVERY={cfg.progress_every}  # seconds between progress lines (0: none)
{_stopping(cfg, slurm=False)}{_progress()}
trap 'on_stop TERM' TERM
trap 'on_stop USR1' USR1
trap 'stop={INTERRUPTED}' INT  # the terminal sent SIGINT to the task too: a second would skip its checkpoint

failed=0
for TASK in {loop}; do
    point=$(head -n 1 "tasks/$TASK.yaml" | sed 's/^# task [0-9]*: //')
    steps=$(sed -n 's/^steps: //p' "tasks/$TASK.yaml")
    echo "[launcher] task $TASK/{n_tasks}: $point -> $LOG_DIR/stdout/$TASK.out"
    echo "[launcher] task $TASK: attempt at $(date '+%F %T') on $(hostname)" >> "stdout/$TASK.out"
    from=$(($(wc -c < "stdout/$TASK.out") + 1))
    last_progress=
    # A background command would start with SIGINT ignored: restore it, so Ctrl-C reaches the task.
    ( trap - INT; trap '' USR1; exec {task_command(cfg, slurm=False)} ) >> "stdout/$TASK.out" 2>&1 &
    child=$!
    wait_task
    child=
    {"torchrun_rc" if cfg.torchrun else ""}
    echo "[launcher] task $TASK: exit code $rc" | tee -a "stdout/$TASK.out"
    if [ "$stop" != 0 ] || [ "$rc" = {PREEMPTED} ] || [ "$rc" = {INTERRUPTED} ]; then
        echo "[launcher] stopped at task $TASK; run 'bash $LOG_DIR/run.sh' to resume"
        [ "$rc" = 0 ] && rc=$stop  # the task had just finished: still report the stop
        exit "$rc"
    fi
    [ "$rc" = 0 ] || failed=$((failed + 1))
done
if [ "$failed" != 0 ]; then
    echo "[launcher] $failed of {n_run} task(s) failed: see $LOG_DIR/stdout/"
    exit 1
fi
echo "[launcher] all {n_run} task(s) done"
"""


def render(
    cfg: LauncherConfig, n_tasks: int, log_dir: Path, python: str = sys.executable, ids: list[int] | None = None
) -> str:
    make = slurm_script if cfg.launcher == "slurm" else bash_script
    return make(cfg, n_tasks, log_dir, python, ids)
