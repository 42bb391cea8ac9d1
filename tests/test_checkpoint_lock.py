"""One trainer per run directory (the lock), and stop signals from the very start of the process."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import CONFIG, tiny, wait_for_steps

from nanollama.train import checkpoint
from nanollama.train.cli import main
from nanollama.train.lock import RunLock
from nanollama.utils.checks import ConfigError

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOLLAMA_ATTENTION": "sdpa"}
HOST = socket.gethostname()


def test_a_held_lock_names_its_holder_and_a_released_one_is_free(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    assert (tmp_path / "run" / ".lock").read_text() == f"{HOST} {os.getpid()}\n"
    with pytest.raises(ConfigError) as caught:
        RunLock(tmp_path / "run").acquire()  # another open file description: flock excludes it
    assert str(caught.value) == (
        f"run_dir: {tmp_path / 'run'} is in use by another trainer (host {HOST}, pid {os.getpid()}); "
        f"{tmp_path / 'run' / '.lock'} is its lock"
    )
    first.release()
    first.release()  # idempotent
    with RunLock(tmp_path / "run") as again:
        assert again.took_over is None  # a clean release names nobody


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("otherhost 4194303\n")  # written, but no process holds the flock
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.took_over == "host otherhost, pid 4194303"
    assert (tmp_path / ".lock").read_text() == f"{HOST} {os.getpid()}\n"
    lock.release()


def test_a_second_trainer_on_a_held_run_dir_fails_at_once_naming_the_holder(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        start = time.monotonic()
        code = main([str(CONFIG), *tiny(), "steps=3", f"run_dir={tmp_path / 'run'}"])
        assert time.monotonic() - start < 10
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: run_dir: {tmp_path / 'run'} is in use by another trainer (host {HOST}, pid {os.getpid()}); "
        f"{tmp_path / 'run' / '.lock'} is its lock\n"
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written
    assert main([str(CONFIG), *tiny(), "steps=3", f"run_dir={tmp_path / 'run'}"]) == 0  # released


def train_command(run_dir: Path, *extra: str, nproc: int | None = None) -> list[str]:
    train = ["-m", "nanollama.train", str(CONFIG), *tiny({"data.batch_size": 4}), f"run_dir={run_dir}", *extra]
    if nproc is None:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *train]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_two_concurrent_launches_the_second_fails_and_a_kill_9_leaves_a_lock_that_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        train_command(run_dir, "steps=100000", nproc=2),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_steps(run_dir, 2, first)
        rank0 = int((run_dir / ".lock").read_text().split()[1])  # only rank 0 holds it
        assert rank0 != first.pid
        start = time.monotonic()
        second = subprocess.run(train_command(run_dir, "steps=3"), env=ENV, capture_output=True, text=True)
        assert time.monotonic() - start < 60
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stderr == (
            f"error: run_dir: {run_dir} is in use by another trainer (host {HOST}, pid {rank0}); "
            f"{run_dir / '.lock'} is its lock\n"
        )
        assert first.poll() is None  # the first one trains on
    finally:
        kill_9_all(first.pid)
        first.communicate(timeout=60)
    third = subprocess.run(train_command(run_dir, "steps=3"), env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"took over the lock of {run_dir} from a dead trainer (host {HOST}, pid {rank0})" in third.stdout


def kill_9_all(launcher: int) -> None:
    """SIGKILL a launcher and its workers (torchrun puts them in process groups of their own)."""
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout
    for pid in [launcher, *map(int, out.split())]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for signum (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signum - 1)))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75)])
def test_a_signal_at_process_start_exits_75_without_a_checkpoint(tmp_path, signum, code):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(run_dir, "steps=3"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 60
    while not catches(proc.pid, signum) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signum)  # during the imports: the handler is the first thing installed
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert f"stopped by {signal.Signals(signum).name} while starting, before the first step" in out
    assert "Traceback" not in out
    assert checkpoint.complete_steps(run_dir / "checkpoints") == []


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked: they must not hold the run's lock after the trainer is gone."""
    import os

    from nanollama.train.lock import RunLock

    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: its copy of the lock's descriptor is closed
            try:
                os.fstat(lock._fd)
                os._exit(1)
            except OSError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lock._fd is not None and os.fstat(lock._fd)  # the parent still holds it
    finally:
        lock.release()
    second = RunLock(tmp_path)
    second.acquire()  # free again
    second.release()
