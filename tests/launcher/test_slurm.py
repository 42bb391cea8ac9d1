"""Integration: the launcher against a real single-node Slurm (started by the `slurm` fixture), and bash.

The same tiny CPU training throughout (configs/gssm/debug.yaml shrunk by TINY). The grid job's task 0
(seed 0) is the uninterrupted reference for the preempted run and for the bash launcher's task 0.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from launcher_helpers import DEBUG, TINY, launcher_cli

from nanollama.launcher import status
from nanollama.observe.metrics import read_records

pytestmark = pytest.mark.slow  # about a minute on 2 idle cores: several short trainings

STEPS = 20
COMMON = [f"config={DEBUG}", "gpus_per_node=0", f"steps={STEPS}", *TINY]
TIMEOUT = 240  # seconds for one job; generous, for machines loaded by other work


def _submit(log_dir: Path, *args: str) -> str:
    res = launcher_cli(*COMMON, "launcher=slurm", f"log_dir={log_dir}", *args)
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(":")[0]
    assert job.isdigit(), res.stdout
    return job


def _wait_done(slurm, job: str, timeout: float = TIMEOUT) -> dict[str, str]:
    """Wait until no task of `job` is pending or running; returns {array task id: final JobState}."""
    deadline = time.monotonic() + timeout
    while slurm.run(["squeue", "-h", "-j", job], check=False).stdout.strip():
        assert time.monotonic() < deadline, slurm.run(["squeue", "-j", job], check=False).stdout
        time.sleep(0.5)
    states = {}
    for block in slurm.run(["scontrol", "show", "job", job]).stdout.split("\n\n"):
        fields = dict(item.split("=", 1) for item in block.split() if "=" in item)
        if "ArrayTaskId" in fields:
            states[fields["ArrayTaskId"]] = f"{fields['JobState']} {fields['ExitCode']}"
    return states


def _final_loss(run_dir: Path) -> tuple[list[int], float]:
    train = [r for r in read_records(run_dir / "metrics.jsonl") if "loss" in r]
    return [r["step"] for r in train], train[-1]["loss"]


@pytest.fixture(scope="module")
def grid_job(slurm, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("grid") / "logs"
    job = _submit(log_dir, "name=grid", "grid.seed=[0,1]")
    return log_dir, job, _wait_done(slurm, job)


def test_grid_array_runs_each_task_with_its_own_config_and_metrics(grid_job):
    log_dir, job, states = grid_job
    assert states == {"0": "COMPLETED 0:0", "1": "COMPLETED 0:0"}, states
    script = (log_dir / "run.sh").read_text()
    assert "#SBATCH --array=0-1\n" in script and "#SBATCH --job-name=grid\n" in script
    losses = []
    for i in (0, 1):
        task = yaml.safe_load((log_dir / "tasks" / f"{i}.yaml").read_text())
        run_dir = log_dir / "runs" / str(i)
        assert task["seed"] == i and task["run_dir"] == str(run_dir) and task["steps"] == STEPS
        assert yaml.safe_load((run_dir / "config.yaml").read_text()) == task  # what the trainer really ran
        steps, loss = _final_loss(run_dir)
        assert steps == list(range(1, STEPS + 1))
        losses.append(loss)
        out = (log_dir / "stdout" / f"{i}.out").read_text()
        assert f"task {i}: job {job}_{i}" in out and f"task {i}: exit code 0" in out and f"done: step {STEPS}" in out
    assert losses[0] != losses[1]  # different seeds, different runs
    table = status.rows(log_dir)
    assert [(r["state"], r["step"], r["steps"], r["loss"]) for r in table] == [
        ("done", STEPS, STEPS, loss) for loss in losses
    ]
    index = [json.loads(line) for line in (log_dir / "tasks.jsonl").read_text().splitlines()]
    assert [(t["id"], t["grid"]) for t in index] == [(0, {"seed": 0}), (1, {"seed": 1})]


def _trainer_pid(log_dir: Path, timeout: float = TIMEOUT) -> int:
    """The pid of the python running tasks/0.yaml from log_dir, once its loop has logged a step.

    (The trainer handles SIGUSR1 from its first instant, so a signal during start-up would stop it
    before any step: a clean 75, but not the mid-run preemption this file tests.)"""
    deadline = time.monotonic() + timeout
    metrics = log_dir / "runs" / "0" / "metrics.jsonl"
    while time.monotonic() < deadline:
        if not metrics.exists() or not metrics.read_text().strip():
            time.sleep(0.005)
            continue
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"tasks/0.yaml" not in argv or b"nanollama.train" not in argv or b"srun" in argv[0]:
                    continue
                if os.readlink(proc / "cwd") != str(log_dir.resolve()):
                    continue
                status = (proc / "status").read_text()
            except OSError:
                continue
            caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
            if caught & (1 << (signal.SIGUSR1 - 1)):
                return int(proc.name)
        time.sleep(0.005)
    raise AssertionError("the task never started its training loop")


def _usr1_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & (1 << (signal.SIGUSR1 - 1)))


def test_preempted_task_checkpoints_requeues_resumes_and_matches_the_uninterrupted_run(slurm, grid_job, tmp_path):
    ref_dir, _, _ = grid_job
    log_dir = tmp_path / "logs"
    job = _submit(log_dir, "name=preempt", "seed=0")
    # Freeze the trainer while the signal travels (scancel -> batch script trap -> srun -> trainer), so
    # that even on a fast machine it cannot finish its few steps before the signal lands.
    pid = _trainer_pid(log_dir)
    os.kill(pid, signal.SIGSTOP)
    try:
        slurm.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"])
        deadline = time.monotonic() + 60
        while not _usr1_pending(pid):
            assert time.monotonic() < deadline, "USR1 never reached the trainer"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGCONT)
    # Requeued: Slurm holds a requeued job back for two minutes (BeginTime). Start it sooner, but only
    # once the first attempt is cleaned up (node idle) and a couple of seconds have passed: slurmd
    # revokes the job's credential at the requeue, with one-second resolution, and would refuse a
    # relaunch within that second.
    deadline = time.monotonic() + 60
    while "BeginTime" not in slurm.run(["squeue", "-h", "-j", job, "-o", "%r"], check=False).stdout:
        assert time.monotonic() < deadline, (log_dir / "stdout" / "0.out").read_text()
        time.sleep(0.2)
    while slurm.run(["sinfo", "-h", "-N", "-o", "%t"], check=False).stdout.strip() != "idle":
        assert time.monotonic() < deadline, slurm.run(["sinfo", "-N"], check=False).stdout
        time.sleep(0.2)
    time.sleep(2.5)
    slurm.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"])
    states = _wait_done(slurm, job)
    assert states == {"0": "COMPLETED 0:0"}, states

    out = (log_dir / "stdout" / "0.out").read_text()
    assert "USR1 at" in out and "exit code 75" in out and f"requeueing {job}_0" in out
    assert "attempt 2" in out and "exit code 0 at" in out.strip().splitlines()[-1]
    log = (log_dir / "runs" / "0" / "train.log").read_text()
    assert "stopped by SIGUSR1" in log and "resumed from" in log
    stopped = int(log.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert 1 <= stopped < STEPS  # really interrupted mid-run
    steps, loss = _final_loss(log_dir / "runs" / "0")
    assert steps == list(range(1, STEPS + 1))  # no step lost or repeated
    assert loss == _final_loss(ref_dir / "runs" / "0")[1]  # bit-exact: same as the uninterrupted run


def test_bash_launcher_gives_the_same_layout_and_results(grid_job, tmp_path):
    ref_dir, _, _ = grid_job
    log_dir = tmp_path / "logs"
    res = launcher_cli(*COMMON, "launcher=bash", "name=grid", f"log_dir={log_dir}", "grid.seed=[0,1]", timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 2 task(s) done" in res.stdout

    def layout(root: Path) -> set[str]:
        skip = ("code/", "runs/0/checkpoints/", "runs/1/checkpoints/")
        return {str(p.relative_to(root)) for p in root.rglob("*") if not str(p.relative_to(root)).startswith(skip)}

    assert layout(log_dir) == layout(ref_dir)
    for i in (0, 1):
        ours = yaml.safe_load((log_dir / "tasks" / f"{i}.yaml").read_text())
        theirs = yaml.safe_load((ref_dir / "tasks" / f"{i}.yaml").read_text())
        assert ours == {**theirs, "run_dir": str(log_dir / "runs" / str(i))}
        assert _final_loss(log_dir / "runs" / str(i)) == _final_loss(ref_dir / "runs" / str(i))
        assert f"done: step {STEPS}" in (log_dir / "stdout" / f"{i}.out").read_text()


def test_torchrun_task_gets_usr1_while_torchrun_survives_and_the_task_requeues(slurm, fake_pkg, tmp_path):
    """slurm + torchrun: srun starts torchrun, which ignores USR1; the worker checkpoints; the job requeues."""
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"steps": 600, "sleep": 0.05, "value": 7}))
    log_dir = tmp_path / "logs"
    res = launcher_cli("script=fakepkg.work", f"config={run}", "torchrun=True", "gpus_per_node=0", f"log_dir={log_dir}")
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(":")[0]
    step = log_dir / "runs" / "0" / "step"
    deadline = time.monotonic() + TIMEOUT
    while not (step.exists() and int(step.read_text() or 0) >= 2):
        assert time.monotonic() < deadline, (log_dir / "stdout" / "0.out").read_text()
        time.sleep(0.1)
    slurm.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"])
    while "BeginTime" not in slurm.run(["squeue", "-h", "-j", job, "-o", "%r"], check=False).stdout:
        assert time.monotonic() < deadline, (log_dir / "stdout" / "0.out").read_text()
        time.sleep(0.2)
    slurm.run(["scancel", job])  # requeued as it should be; the resume itself is tested above
    out = (log_dir / "stdout" / "0.out").read_text()
    assert "value 7 rank 0" in out  # started by torchrun (it sets RANK)
    assert "stopped by USR1" in out and "exitcode  : 75" in out  # the worker, not torchrun, got the signal
    # torchrun reports 1; the script takes the worker's own 75 from torchrun's failure report, and requeues.
    assert "torchrun exited 1, its workers 75" in out and "exit code 75 at" in out and f"requeueing {job}_0" in out
    assert int(step.read_text()) < 600
