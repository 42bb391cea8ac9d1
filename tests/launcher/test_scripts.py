"""run.sh generation, and the scripts' signal/requeue logic run for real with stand-ins for srun and scontrol."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from launcher_helpers import DEBUG, launcher_cli

from nanollama import config
from nanollama.launcher import launch, scripts, spec
from nanollama.launcher.__main__ import main


def _cfg(**launcher) -> spec.LauncherConfig:
    return config.build(spec.LauncherConfig, launcher)


def _bash_syntax_ok(text: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sh"
    path.write_text(text)
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_slurm_script_has_the_array_signal_requeue_and_resources(tmp_path):
    cfg = _cfg(
        name="sweep",
        nodes=2,
        gpus_per_node=4,
        slurm={
            "partition": "learn",
            "time": 90,
            "mem": "64G",
            "cpus_per_task": 8,
            "account": "acct",
            "qos": "high",
            "constraint": "volta32gb",
            "exclude": "node[1-2]",
            "signal_time": 300,
            "max_parallel": 2,
            "extra": ["--mail-type=END", "#SBATCH --comment=x"],
        },
    )
    text = scripts.slurm_script(cfg, 6, tmp_path, python="/venv/bin/python")
    directives = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=sweep",
        "--array=0-5%2",
        f"--output={tmp_path}/stdout/%a.out",
        "--open-mode=append",
        "--nodes=2",
        "--ntasks-per-node=4",  # without torchrun: one process per GPU, started by srun
        "--signal=B:USR1@300",
        "--requeue",
        "--gpus-per-node=4",
        "--partition=learn",
        "--time=90",
        "--mem=64G",
        "--cpus-per-task=8",
        "--account=acct",
        "--qos=high",
        "--constraint=volta32gb",
        "--exclude=node[1-2]",
        "--mail-type=END",
        "--comment=x",
    ]
    # USR1 ignored until the trainer installs its handler: run.sh re-sends it, and an early one is not fatal.
    inner = 'trap "" USR1; exec "$NANOLLAMA_PYTHON" -u -m nanollama.train tasks/$TASK.yaml'
    assert f"srun --kill-on-bad-exit=1 bash -c '{inner}' &" in text
    assert "export NANOLLAMA_PYTHON=/venv/bin/python" in text
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_$TASK"' in text
    assert '[ "$rc" = 75 ]' in text
    _bash_syntax_ok(text, tmp_path)


def test_slurm_torchrun_runs_one_torchrun_per_node_with_rendezvous_on_the_first_node(tmp_path):
    cfg = _cfg(nodes=2, gpus_per_node=8, torchrun=True, slurm={"gpus": "a100:8"})
    text = scripts.slurm_script(cfg, 1, tmp_path)
    assert "#SBATCH --ntasks-per-node=1\n" in text and "#SBATCH --gpus-per-node=a100:8\n" in text
    assert "#SBATCH --array=0-0\n" in text
    assert 'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    cmd = scripts.task_command(cfg, slurm=True)
    assert cmd.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c ")
    for piece in (
        'trap "" USR1',
        "-m torch.distributed.run",
        "--nnodes=$SLURM_JOB_NUM_NODES",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"',
        "-m nanollama.train tasks/$TASK.yaml",
    ):
        assert piece in cmd
    assert "torchrun_rc\n" in text  # torchrun turns the trainer's 75 into 1: the workers' codes come from its report
    _bash_syntax_ok(text, tmp_path)


def test_cpu_jobs_ask_for_no_gpu(tmp_path):
    text = scripts.slurm_script(_cfg(gpus_per_node=0), 2, tmp_path)
    assert "gpus" not in text and "#SBATCH --ntasks-per-node=1\n" in text


def test_bash_script_runs_tasks_in_order_and_torchrun_over_local_gpus(tmp_path):
    plain = scripts.bash_script(_cfg(launcher="bash"), 3, tmp_path)
    assert "for TASK in $(seq 0 2)" in plain and "sbatch" not in plain and "srun" not in plain
    assert (
        "( trap - INT; trap '' USR1; exec \"$NANOLLAMA_PYTHON\" -u -m nanollama.train tasks/$TASK.yaml )"
        ' >> "stdout/$TASK.out"' in plain
    )
    _bash_syntax_ok(plain, tmp_path)
    torch = scripts.bash_script(_cfg(launcher="bash", torchrun=True, gpus_per_node=0), 1, tmp_path)
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=1 -m nanollama.train" in torch
    two = scripts.task_command(_cfg(launcher="bash", torchrun=True, gpus_per_node=2), slurm=False)
    assert "--nproc-per-node=2" in two
    _bash_syntax_ok(torch, tmp_path)


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """srun that just runs its command, scontrol that records its arguments: the batch script's logic alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _prepare_fake(tmp_path: Path, launcher: str, steps: int, sleep: float, values=(1,), *more) -> launch.Prepared:
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"steps": steps, "sleep": sleep, "value": 0}))
    args = [
        "script=fakepkg.work",
        f"config={run}",
        f"launcher={launcher}",
        f"log_dir={tmp_path / 'logs'}",
        f"grid.value={list(values)}",
        *more,
    ]
    return launch.prepare(spec.parse(args), dry_run=True)


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_batch_script_forwards_the_signal_and_requeues_only_after_usr1(fake_pkg, tmp_path, sig, requeued):
    p = _prepare_fake(tmp_path, "slurm", steps=60, sleep=0.05)
    env = {
        **os.environ,
        "PATH": f"{_fake_slurm_bin(tmp_path)}:{os.environ['PATH']}",
        "SLURM_ARRAY_TASK_ID": "0",
        "SLURM_ARRAY_JOB_ID": "41",
        "SLURM_JOB_ID": "42",
    }
    out = open(tmp_path / "batch.out", "w")
    proc = subprocess.Popen(["bash", str(p.script)], env=env, stdout=out, stderr=subprocess.STDOUT)
    step_file = p.log_dir / "runs" / "0" / "step"
    _wait_for(lambda: step_file.exists() and int(step_file.read_text() or 0) >= 2)
    proc.send_signal(sig)  # what sbatch --signal=B:USR1 (or scancel) does to the batch shell
    assert proc.wait(timeout=20) == 75
    stopped_at = int(step_file.read_text())
    assert stopped_at < 60
    log = (tmp_path / "batch.out").read_text()
    assert f"stopped by {sig.name.removeprefix('SIG')} at {stopped_at}" in log
    calls = tmp_path / "scontrol.calls"
    if requeued:
        assert calls.read_text().split() == ["requeue", "41_0"]
        # The requeued attempt resumes where the first stopped and finishes.
        res = subprocess.run(["bash", str(p.script)], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and f"start {stopped_at}" in res.stdout and "done 60" in res.stdout
    else:
        assert not calls.exists()  # scancel must still cancel


def test_bash_launcher_runs_every_task_and_stops_resumably_on_a_signal(fake_pkg, tmp_path):
    p = _prepare_fake(tmp_path, "bash", steps=60, sleep=0.02, values=(1, 2))
    proc = subprocess.Popen(["bash", str(p.script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step_file = p.log_dir / "runs" / "0" / "step"
    _wait_for(lambda: step_file.exists() and int(step_file.read_text() or 0) >= 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 75 and "stopped at task 0" in out
    assert not (p.log_dir / "runs" / "1").exists()  # the loop stopped
    res = subprocess.run(["bash", str(p.script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "all 2 task(s) done" in res.stdout
    for i, value in enumerate((1, 2)):
        task_out = (p.log_dir / "stdout" / f"{i}.out").read_text()
        assert f"value {value}" in task_out and "done 60" in task_out
    assert "stopped by TERM" in (p.log_dir / "stdout" / "0.out").read_text()


def test_bash_launcher_ctrl_c_reaches_the_task_and_stops_the_loop(fake_pkg, tmp_path):
    p = _prepare_fake(tmp_path, "bash", steps=200, sleep=0.02, values=(1, 2))
    # As in a terminal: the script and its task in one process group, Ctrl-C sent to the whole group.
    proc = subprocess.Popen(["bash", str(p.script)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    step_file = p.log_dir / "runs" / "0" / "step"
    _wait_for(lambda: step_file.exists() and int(step_file.read_text() or 0) >= 2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "stopped at task 0" in out
    assert int(step_file.read_text()) < 200  # the task itself was interrupted, not left to finish
    assert not (p.log_dir / "runs" / "1").exists()


def test_bash_torchrun_runs_the_task_under_torchrun(fake_pkg, tmp_path):
    p = _prepare_fake(tmp_path, "bash", 2, 0.0, (1,), "torchrun=True", "gpus_per_node=0")
    res = subprocess.run(["bash", str(p.script)], capture_output=True, text=True, timeout=120)
    out = (p.log_dir / "stdout" / "0.out").read_text()
    assert res.returncode == 0, out
    assert "value 1 rank 0" in out and "done 2" in out  # RANK comes from torchrun


def test_tasks_run_the_code_snapshot_not_later_edits(fake_pkg, tmp_path):
    p = _prepare_fake(tmp_path, "bash", steps=1, sleep=0.0)
    assert (p.log_dir / "code" / "fakepkg" / "work.py").is_file()
    assert (p.log_dir / "code" / "nanollama" / "launcher" / "scripts.py").is_file()
    assert (p.log_dir / "code" / "git.txt").read_text().startswith("repository: ")  # this checkout is git
    (fake_pkg / "work.py").write_text("raise SystemExit(9)\n")  # an edit after launching
    res = subprocess.run(["bash", str(p.script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout
    assert "VERSION v1" in (p.log_dir / "stdout" / "0.out").read_text()


def test_existing_log_dir_is_refused_unless_overwrite(fake_pkg, tmp_path):
    p = _prepare_fake(tmp_path, "bash", steps=1, sleep=0.0)
    (p.log_dir / "DRY_RUN").unlink()  # as if it had really run
    (p.log_dir / "stdout" / "0.out").write_text("old")
    with pytest.raises(config.ConfigError, match="already exists"):
        _prepare_fake(tmp_path, "bash", steps=1, sleep=0.0)
    args = ["script=fakepkg.work", f"config={tmp_path / 'run.yaml'}", "launcher=bash"]
    launch.prepare(spec.parse([*args, f"log_dir={p.log_dir}", "overwrite=true"]), dry_run=True)
    assert not (p.log_dir / "stdout" / "0.out").exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(config.ConfigError, match="not a launcher log directory"):
        launch.prepare(spec.parse([*args, f"log_dir={other}", "overwrite=true"]), dry_run=True)
    assert (other / "thesis.tex").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["launcher=slurm"], "sbatch, which is not on this machine; use launcher=bash"),
        (["launcher=bash", "grid.optim.lrr=[1,2]"], "launcher.grid.optim.lrr: is not a key of the run config"),
        (["launcher=bash", "grid.seed=[]"], "launcher.grid.seed: is an empty list"),
        (["--nope"], "unknown option --nope"),
        (["launcher=bash", "steps=-1"], "run.steps: must be >= 0"),
    ],
)
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main([f"config={DEBUG}", f"log_dir={log_dir}", *args]) == 2
    out, err = capsys.readouterr()
    first, *rest = err.splitlines()
    assert first.startswith("error: ") and message in first
    assert all(line.lstrip().startswith(("usage:", "or:")) for line in rest)  # at most the usage follows
    assert out == "" and not log_dir.exists()


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    res = launcher_cli(f"config={DEBUG}", f"log_dir={tmp_path / 'logs'}", "launcher=bash", "grid.model.dimm=[8]")
    assert res.returncode == 2
    assert res.stderr.startswith("error: launcher.grid.model.dimm: is not a key of the run config (model.dimm: unknown")
    assert "did you mean" in res.stderr and "dim'?" in res.stderr and res.stderr.count("\n") == 1


def test_cli_dry_run_writes_the_layout_and_prints_the_command(tmp_path):
    log_dir = tmp_path / "logs"
    res = launcher_cli(f"config={DEBUG}", f"log_dir={log_dir}", "grid.seed=[3,4]", "steps=5", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert f"dry run: would run  sbatch --parsable {log_dir}/run.sh" in res.stdout
    assert "task 1: seed=4" in res.stdout
    for name in (
        "run.sh",
        "launcher.yaml",
        "tasks.jsonl",
        "tasks/0.yaml",
        "tasks/1.yaml",
        "code/nanollama/train/__main__.py",
    ):
        assert (log_dir / name).is_file(), name
    assert (log_dir / "stdout").is_dir() and (log_dir / "runs").is_dir()
    resolved = yaml.safe_load((log_dir / "launcher.yaml").read_text())
    assert resolved["launcher"]["log_dir"] == str(log_dir) and resolved["run"]["steps"] == 5
    # the launch that follows a dry run replaces its directory without overwrite=true ...
    res = launcher_cli(f"config={DEBUG}", f"log_dir={log_dir}", "grid.seed=[3]", "steps=5", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert not (log_dir / "tasks" / "1.yaml").exists()
    # ... but a directory a real launch wrote is kept unless asked
    (log_dir / "DRY_RUN").unlink()
    res = launcher_cli(f"config={DEBUG}", f"log_dir={log_dir}", "grid.seed=[3]", "steps=5", "--dry-run")
    assert res.returncode == 2 and "already exists" in res.stderr


@pytest.mark.parametrize(
    "report, expected",
    [
        ("exitcode  : 75 (pid: 11)\nexitcode  : 75 (pid: 12)\n", 75),  # every worker stopped as asked
        ("exitcode  : 75 (pid: 11)\nexitcode  : -9 (pid: 12)\n", 1),  # one was killed by a signal
        ("no failure report at all\n", 1),  # nothing says the workers stopped cleanly
    ],
)
def test_torchrun_exit_is_75_only_when_every_worker_reports_it(tmp_path, report, expected):
    (tmp_path / "stdout").mkdir()
    (tmp_path / "stdout" / "0.out").write_text(report)
    script = scripts._torchrun_rc() + "TASK=0; from=1; stop=75; rc=1; torchrun_rc; exit $rc\n"
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == expected, res.stdout + res.stderr
