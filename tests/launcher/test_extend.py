"""Extending a sweep (launcher extend=true): stable task ids, only unfinished tasks run, old results untouched."""

import json
import os

import pytest
import yaml
from launcher_helpers import DEBUG, TINY, launcher_cli

from nanollama.config import ConfigError
from nanollama.launcher import grid, launch, scripts, spec, status


def test_ids_are_stable_when_points_are_added_anywhere():
    old = [{"lr": 0.1, "seed": 0}, {"lr": 0.3, "seed": 0}]
    known = {grid.point_key(p): i for i, p in enumerate(old)}
    new = [{"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 0}, {"lr": 0.3, "seed": 0}, {"lr": 0.1, "seed": 1}]
    assert grid.assign_ids(new, known) == [0, 2, 1, 3]
    assert grid.assign_ids(new) == [0, 1, 2, 3]  # a fresh launch: grid positions, as before
    assert grid.point_key({"seed": 0, "lr": 0.1}) == grid.point_key({"lr": 0.1, "seed": 0})


def test_array_indices_compress_runs():
    assert scripts.array_indices([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    assert scripts.array_indices([4]) == "4"


def _args(tmp_path, values, launcher="bash", *more):
    run = tmp_path / "run.yaml"
    if not run.exists():
        run.write_text(yaml.safe_dump({"steps": 3, "sleep": 0.0, "value": 0}))
    return [
        "script=fakepkg.work",
        f"config={run}",
        f"launcher={launcher}",
        f"log_dir={tmp_path / 'logs'}",
        f"grid.value={values}",
        *more,
    ]


def _finished(log_dir, states: dict[int, int | None]):
    """Fake earlier attempts: exit code per task id (None: started, never exited)."""
    (log_dir / "SUBMITTED").write_text("bash run.sh\n")
    (log_dir / "DRY_RUN").unlink(missing_ok=True)
    for i, code in states.items():
        text = f"[launcher] task {i}: attempt at t on vm\n"
        text += "" if code is None else f"[launcher] task {i}: exit code {code}\n"
        (log_dir / "stdout" / f"{i}.out").write_text(text)


def test_extension_runs_only_the_new_and_unfinished_tasks(fake_pkg, tmp_path, monkeypatch, capsys):
    p = launch.prepare(spec.parse(_args(tmp_path, "[1,2,3,4,6]")), dry_run=True)
    _finished(p.log_dir, {0: 0, 1: 75, 2: 0, 3: 3, 4: None})  # 1 preempted, 3 diverged, 4 killed (no exit line)
    with pytest.raises(ConfigError, match="extend=true to add grid points"):
        launch.prepare(spec.parse(_args(tmp_path, "[1,2,3]")))
    before = (p.log_dir / "tasks" / "0.yaml").read_text()
    q = launch.prepare(spec.parse(_args(tmp_path, "[1,5,2,3,4,6]", "bash", "extend=true")))
    assert [(t.id, t.point["value"]) for t in q.tasks] == [(0, 1), (5, 5), (1, 2), (2, 3), (3, 4), (4, 6)]
    assert q.run_ids == [1, 4, 5]
    text = launch.summary(q)
    assert "  task 5: value=5  (to run)" in text and "task 0: value=1  (done: skipped)" in text
    assert "task 1: value=2  (preempted: resumes)" in text and "task 3: value=4  (failed (3): skipped)" in text
    assert "task 4: value=6  (running: resumes)" in text
    assert "for TASK in 1 4 5; do" in (p.log_dir / "run.sh").read_text()
    assert (p.log_dir / "tasks" / "0.yaml").read_text() == before
    assert yaml.safe_load((p.log_dir / "tasks" / "5.yaml").read_text())["run_dir"] == str(p.log_dir / "runs" / "5")
    index = [json.loads(line) for line in (p.log_dir / "tasks.jsonl").read_text().splitlines()]
    assert [(e["id"], e["grid"]["value"]) for e in index] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 6), (5, 5)]
    states = [r["state"] for r in status.rows(p.log_dir)]
    assert states == ["done", "preempted", "done", "failed (3)", "running", "pending"]

    # Slurm: an array of only the pending tasks; a refused submission puts the old files back
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "sbatch").write_text("#!/bin/bash\nexit 1\n")
    (tmp_path / "sbatch").chmod(0o755)
    run_sh, index_text = (p.log_dir / "run.sh").read_text(), (p.log_dir / "tasks.jsonl").read_text()
    more = ["extend=true", "slurm.max_parallel=2"]
    s = launch.prepare(spec.parse(_args(tmp_path, "[1,5,2,3,4,6,8]", "slurm", *more)))
    assert s.run_ids == [1, 4, 5, 6] and "#SBATCH --array=1,4-6%2" in (p.log_dir / "run.sh").read_text()
    with pytest.raises(ConfigError, match="sbatch refused"):
        launch.submit_slurm(s)
    assert (p.log_dir / "run.sh").read_text() == run_sh and (p.log_dir / "tasks.jsonl").read_text() == index_text
    assert not (p.log_dir / "tasks" / "6.yaml").exists()


def test_extension_refuses_a_changed_run_config_and_extend_with_overwrite(fake_pkg, tmp_path):
    p = launch.prepare(spec.parse(_args(tmp_path, "[1,2]")), dry_run=True)
    _finished(p.log_dir, {0: 0, 1: 0})
    with pytest.raises(ConfigError, match=r"task 0 .* ran with another config \(steps: 3 -> 9\)"):
        launch.prepare(spec.parse([*_args(tmp_path, "[1,2,3]", "bash", "extend=true"), "steps=9"]))
    assert not (p.log_dir / "tasks" / "2.yaml").exists()  # nothing written
    with pytest.raises(ConfigError, match="choose one"):
        spec.parse([*_args(tmp_path, "[1]"), "extend=true", "overwrite=true"])
    nothing = launch.prepare(spec.parse(_args(tmp_path, "[2,1]", "bash", "extend=true")))
    assert nothing.run_ids == []  # all done: run.sh is not rewritten
    assert "for TASK in $(seq 0 1); do" in (p.log_dir / "run.sh").read_text()


@pytest.mark.slow
def test_fake_sweep_extended_from_the_command_line(fake_pkg, tmp_path):
    """~3 s: the launcher CLI twice (extend=true from the start), the fake task in subprocesses."""
    args = _args(tmp_path, "[1,2]", "bash", "extend=true")
    res = launcher_cli(*args, env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    assert res.returncode == 0 and "all 2 task(s) done" in res.stdout, res.stdout + res.stderr
    log_dir = tmp_path / "logs"
    before = {i: (log_dir / "runs" / str(i) / "metrics.jsonl").read_bytes() for i in (0, 1)}
    res = launcher_cli(*_args(tmp_path, "[1,7,2]", "bash", "extend=true"), env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    assert res.returncode == 0 and "all 1 task(s) done" in res.stdout, res.stdout + res.stderr
    assert {i: (log_dir / "runs" / str(i) / "metrics.jsonl").read_bytes() for i in (0, 1)} == before
    assert (log_dir / "stdout" / "0.out").read_text().count("attempt at") == 1  # never started again
    assert [(r["id"], r["grid"]["value"], r["state"], r["step"]) for r in status.rows(log_dir)] == [
        (0, 1, "done", 3),
        (1, 2, "done", 3),
        (2, 7, "done", 3),
    ]
    res = launcher_cli(*_args(tmp_path, "[1,7,2]", "bash", "extend=true"), env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    assert res.returncode == 0 and "nothing to run" in res.stdout


@pytest.mark.slow
def test_training_sweep_extended_trains_only_the_new_point(tmp_path):
    """~25 s: nanollama.train, 2 seeds then 3 (one more in the middle); the first two runs are not touched."""
    log_dir = tmp_path / "logs"
    base = [f"config={DEBUG}", f"log_dir={log_dir}", "launcher=bash", "extend=true", "steps=3", "device=cpu"]
    base += [*TINY, "progress_every=0"]
    res = launcher_cli(*base, "grid.seed=[0,2]")
    assert res.returncode == 0, res.stdout + res.stderr
    metrics = {i: (log_dir / "runs" / str(i) / "metrics.jsonl").read_bytes() for i in (0, 1)}
    res = launcher_cli(*base, "grid.seed=[0,1,2]")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "task 2: seed=1  (to run)" in res.stdout and "all 1 task(s) done" in res.stdout
    assert {i: (log_dir / "runs" / str(i) / "metrics.jsonl").read_bytes() for i in (0, 1)} == metrics
    rows = status.rows(log_dir)
    assert [(r["grid"]["seed"], r["state"], r["step"]) for r in rows] == [
        (0, "done", 3),
        (2, "done", 3),
        (1, "done", 3),
    ]
    assert rows[0]["loss"] != rows[2]["loss"]  # seed 1 really trained, in its own run dir
    assert status.table(log_dir).splitlines()[-1].startswith("3 done  ")
