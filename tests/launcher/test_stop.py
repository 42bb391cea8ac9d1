"""Stopping a real training through every launch form: SIGTERM/SIGUSR1 to the launcher-level process (bash run.sh,
or the Slurm batch script) checkpoints every rank, ends in 75 (preempted), and leaves no process of the run behind.

Each test starts a long tiny CPU training, waits for its first metrics line (the training loop runs), signals
and checks. Before the fix, USR1 to `bash run.sh` under torchrun killed torchrun (138) and orphaned its workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher_helpers import DEBUG, ROOT, TINY, launcher_cli

from nanollama.launcher import status
from nanollama.observe.metrics import read_records

pytestmark = pytest.mark.slow

STEPS = 100000  # never reached: every run here is stopped
COMMON = [f"config={DEBUG}", f"steps={STEPS}", *TINY]
TIMEOUT = 180  # seconds for one start or stop; generous, for machines loaded by other work


def _procs_in(log_dir: Path) -> list[str]:
    """The processes working in log_dir (run.sh cds there; torchrun and the trainers inherit it): 'pid cmdline'."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.readlink(proc / "cwd") != str(log_dir):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, its parent (pytest's Popen) not yet told
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            found.append(f"{proc.name} {argv}")
        except OSError:
            continue
    return found


def _wait_for_metrics(log_dir: Path, out: Path | None = None, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not [r for r in read_records(log_dir / "runs" / "0" / "metrics.jsonl") if "loss" in r]:
        log = out.read_text() if out and out.exists() else ""
        assert time.monotonic() < deadline, log + (log_dir / "stdout" / "0.out").read_text()
        time.sleep(0.2)


def _checkpointed(log_dir: Path, sig: str, ranks: int) -> int:
    """The step the trainer stopped at, after checking it says so and its checkpoint is complete."""
    run = log_dir / "runs" / "0"
    log = (run / "train.log").read_text()
    assert f"stopped by {sig} at step " in log, log
    step = int(log.split(f"stopped by {sig} at step ")[1].split(";")[0])
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    written = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
    assert "COMPLETE" in written and all(f"train_state_rank{r}.pt" in written for r in range(ranks)), written
    assert 1 <= step < STEPS
    last = max(r["step"] for r in read_records(run / "metrics.jsonl") if "loss" in r)
    assert last == step  # no step ran after the one checkpointed
    return step


def _no_process_left(log_dir: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _procs_in(log_dir):
        assert time.monotonic() < deadline, "left behind:\n" + "\n".join(_procs_in(log_dir))
        time.sleep(0.2)


@pytest.mark.parametrize(
    "torchrun, sig",
    [(False, signal.SIGUSR1), (True, signal.SIGUSR1), (True, signal.SIGTERM)],
    ids=["plain-USR1", "torchrun-USR1", "torchrun-TERM"],
)
def test_bash_launch_stops_every_rank_with_a_checkpoint_and_75(tmp_path, torchrun, sig):
    log_dir = (tmp_path / "logs").resolve()
    ranks = 2 if torchrun else 1
    more = [f"torchrun={torchrun}", f"gpus_per_node={ranks if torchrun else 0}"]
    out = tmp_path / "launcher.out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "nanollama.launcher", *COMMON, "launcher=bash", f"log_dir={log_dir}", *more]
    with open(out, "w") as f:  # the launcher execs `bash run.sh`: proc is the launcher-level process
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_for_metrics(log_dir, out)
        proc.send_signal(sig)
        assert proc.wait(timeout=TIMEOUT) == 75, out.read_text() + (log_dir / "stdout" / "0.out").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    _checkpointed(log_dir, "SIGUSR1" if torchrun else sig.name, ranks)  # torchrun's workers get USR1 for both
    assert "stopped at task 0" in out.read_text()
    assert [r["state"] for r in status.rows(log_dir)] == ["preempted"]
    _no_process_left(log_dir)


def _job_state(slurm, job: str, timeout: float = TIMEOUT) -> str:
    """'STATE EXIT:SIG' of array task job_0 once it is no longer running."""
    deadline = time.monotonic() + timeout
    while True:
        fields = dict(
            item.split("=", 1)
            for item in slurm.run(["scontrol", "show", "job", f"{job}_0"]).stdout.split()
            if "=" in item
        )
        if fields.get("JobState") not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING"):
            return f"{fields.get('JobState')} {fields.get('ExitCode')}"
        if fields.get("JobState") == "PENDING" and "BeginTime" in fields.get("Reason", ""):
            return "REQUEUED"  # held back after a requeue (about two minutes)
        assert time.monotonic() < deadline, fields
        time.sleep(0.3)


@pytest.mark.parametrize(
    "torchrun, how, expected",
    [(False, ["--signal=USR1", "--batch"], "REQUEUED"), (True, ["--signal=TERM", "--batch"], "FAILED 75:0")],
    ids=["plain-USR1-requeues", "torchrun-TERM"],
)
def test_slurm_launch_stops_with_a_checkpoint_and_75(slurm, tmp_path, torchrun, how, expected):
    log_dir = (tmp_path / "logs").resolve()
    res = launcher_cli(*COMMON, "launcher=slurm", f"torchrun={torchrun}", "gpus_per_node=0", f"log_dir={log_dir}")
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(":")[0]
    try:
        _wait_for_metrics(log_dir)
        slurm.run(["scancel", *how, f"{job}_0"])
        assert _job_state(slurm, job) == expected, (log_dir / "stdout" / "0.out").read_text()
    finally:
        slurm.run(["scancel", job], check=False)  # the requeued attempt is not needed: resuming is tested elsewhere
    text = (log_dir / "stdout" / "0.out").read_text()
    assert "[launcher] task 0: exit code 75 at" in text, text
    _checkpointed(log_dir, "SIGUSR1" if torchrun or "USR1" in how[0] else "SIGTERM", 1)
    assert [r["state"] for r in status.rows(log_dir)] == ["preempted"]
    _no_process_left(log_dir)
