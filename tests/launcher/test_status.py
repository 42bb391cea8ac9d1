"""The status table: state from run.sh's stdout lines, progress and losses from metrics.jsonl."""

import json

import yaml

from nanollama.launcher import launch, layout, spec, status


def test_status_reads_each_tasks_state_and_metrics(fake_pkg, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"steps": 50, "sleep": 0.0, "value": 0}))
    args = ["script=fakepkg.work", f"config={run}", "launcher=bash", f"log_dir={tmp_path / 'logs'}"]
    p = launch.prepare(spec.parse([*args, "grid.value=[1,2,3,4]"]), dry_run=True)
    layout.mark_submitted(p.log_dir, "slurm job 9")  # as after sbatch: task 3, without output, is pending
    out = p.log_dir / "stdout"
    (out / "0.out").write_text("[launcher] task 0: attempt 1\nhello\n[launcher] task 0: exit code 0 at now\n")
    (out / "1.out").write_text(
        "[launcher] task 1: job 9_1 (id 10), attempt 1, vm\n[launcher] task 1: exit code 75 at t\n"
        "[launcher] task 1: requeueing 9_1; the next attempt resumes from the checkpoint\n"
        "[launcher] task 1: job 9_1 (id 10), attempt 2, vm\n"
    )
    (out / "2.out").write_text("[launcher] task 2: attempt 1\n[launcher] task 2: exit code 3\n")
    metrics = [
        {"step": 10, "loss": 2.5},
        {"step": 20, "loss": 2.25},
        {"step": 20, "eval_loss": 2.4, "bayes_loss": 2.0, "excess_loss": 0.4},
    ]
    run0 = p.log_dir / "runs" / "0"
    run0.mkdir()
    (run0 / "metrics.jsonl").write_text("\n".join(map(json.dumps, metrics)) + '\n{"step": 21, "lo')  # half-written
    rows = status.rows(p.log_dir)
    assert [r["state"] for r in rows] == ["done", "running", "failed (3)", "pending"]
    assert [r["grid"] for r in rows] == [{"value": v} for v in (1, 2, 3, 4)]
    first = rows[0]
    assert (first["step"], first["steps"], first["loss"], first["eval_loss"], first["excess_loss"]) == (
        20,
        50,
        2.25,
        2.4,
        0.4,
    )
    assert rows[3]["step"] == 0 and rows[3]["loss"] is None
    assert status.main([str(p.log_dir)]) == 0
    text = capsys.readouterr().out
    assert "value=1" in text and "20/50" in text and "2.2500" in text and "0.4000" in text
    assert "1 done, 1 running, 1 failed, 1 pending" in text
    assert status.main([str(tmp_path)]) == 2 and "not a launcher log directory" in capsys.readouterr().err


def test_a_requeued_task_is_preempted_until_its_next_attempt_starts(tmp_path):
    out = tmp_path / "0.out"
    out.write_text(
        "[launcher] task 0: job 9_0 (id 10), attempt 1, vm\n[launcher] task 0: exit code 75 at t\n"
        "[launcher] task 0: requeueing 9_0; the next attempt resumes from the checkpoint\n"
    )
    assert status.task_state(out) == "preempted"  # the word "attempt" in the requeue line is no new attempt
    out.write_text(out.read_text() + "[launcher] task 0: job 9_0 (id 10), attempt 2, vm\n")
    assert status.task_state(out) == "running"
    out.write_text("[launcher] task 0: attempt at 2026-01-01 on vm\n")  # bash
    assert status.task_state(out) == "running"
