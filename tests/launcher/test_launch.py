"""Submission: a refused launch leaves nothing behind, a dry run is "not submitted", launcher-key typos say which."""

import os
import subprocess

import pytest
from launcher_helpers import DEBUG

from nanollama.launcher import launch, layout, spec, status
from nanollama.launcher.__main__ import main


def _fake_sbatch(where, monkeypatch, script: str) -> None:
    """An sbatch that runs `script` (bash) first on PATH, so the launcher takes the Slurm path without Slurm."""
    bin_dir = where / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/bash\n" + script)
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_a_launch_sbatch_refuses_leaves_no_log_directory(tmp_path, monkeypatch, capsys):
    _fake_sbatch(
        tmp_path / "refuse", monkeypatch, 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n'
    )
    log_dir = tmp_path / "logs" / "x"  # logs/ does not exist yet: it must not be left behind either
    assert main([f"config={DEBUG}", f"log_dir={log_dir}", "partition=nope"]) == 2
    assert capsys.readouterr().err == (
        "error: launcher.slurm: sbatch refused the job (sbatch: error: invalid partition specified: nope);"
        " nothing was written\n"
    )
    assert not (tmp_path / "logs").exists()
    # The retry needs no overwrite=true, and goes through.
    _fake_sbatch(tmp_path / "ok", monkeypatch, "echo 123\n")
    assert main([f"config={DEBUG}", f"log_dir={log_dir}"]) == 0
    assert "submitted job 123:" in capsys.readouterr().out
    assert (log_dir / layout.SUBMITTED).read_text() == "slurm job 123\n"
    assert [r["state"] for r in status.rows(log_dir)] == ["pending"]


def test_a_refused_overwrite_puts_the_old_directory_back(tmp_path, monkeypatch, capsys):
    log_dir = tmp_path / "logs"
    _fake_sbatch(tmp_path / "ok", monkeypatch, "echo 7\n")
    assert main([f"config={DEBUG}", f"log_dir={log_dir}"]) == 0
    (log_dir / "stdout" / "0.out").write_text("the first launch's output\n")
    _fake_sbatch(tmp_path / "refuse", monkeypatch, "exit 1\n")
    assert main([f"config={DEBUG}", f"log_dir={log_dir}", "overwrite=true", "steps=3"]) == 2
    assert "sbatch refused the job (exit code 1)" in capsys.readouterr().err
    assert (log_dir / "stdout" / "0.out").read_text() == "the first launch's output\n"  # not lost
    assert "steps: 3" not in (log_dir / "tasks" / "0.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "ok", "refuse"]  # nothing set aside remains


def test_dry_run_tasks_are_not_submitted_until_run_sh_runs(fake_pkg, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("steps: 1\nsleep: 0.0\nvalue: 0\n")
    args = ["script=fakepkg.work", f"config={run}", "launcher=bash", f"log_dir={tmp_path / 'logs'}", "grid.value=[1,2]"]
    p = launch.prepare(spec.parse(args), dry_run=True)
    assert [r["state"] for r in status.rows(p.log_dir)] == ["not submitted", "not submitted"]
    assert status.table(p.log_dir).splitlines()[-1].startswith("2 not submitted  (metrics: ")
    # Running the dry run's script by hand makes it a real launch: it is marked so, and no longer a dry run.
    res = subprocess.run(["bash", str(p.script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [r["state"] for r in status.rows(p.log_dir)] == ["done", "done"]
    assert (p.log_dir / layout.SUBMITTED).exists() and not (p.log_dir / layout.DRY_RUN).exists()


@pytest.mark.parametrize(
    "arg, message",
    [
        ("partiton=learn", "error: partiton: unknown key (did you mean 'partition'?)"),
        ("launcher.partiton=learn", "error: launcher.partiton: unknown key (did you mean 'launcher.slurm.partition'?)"),
        ("torchrn=true", "error: torchrn: unknown key (did you mean 'torchrun'?)"),
        (
            "launcher.slurm.signal_tme=3",
            "error: launcher.slurm.signal_tme: unknown key (did you mean 'launcher.slurm.signal_time'?)",
        ),
    ],
)
def test_a_mistyped_launcher_key_suggests_the_launcher_key(tmp_path, capsys, arg, message):
    assert main([f"config={DEBUG}", f"log_dir={tmp_path / 'logs'}", "launcher=bash", arg]) == 2
    out, err = capsys.readouterr()
    assert err == message + "\n" and out == ""
    assert not (tmp_path / "logs").exists()
