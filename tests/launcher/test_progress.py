"""The bash launcher's progress lines: a running task's step and loss, read from its metrics.jsonl."""

import re
import subprocess

import yaml

from nanollama.launcher import launch, spec


def test_bash_launcher_prints_the_running_tasks_step_and_loss(fake_pkg, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"steps": 40, "sleep": 0.1, "value": 0}))
    args = ["script=fakepkg.work", f"config={run}", "launcher=bash", f"log_dir={tmp_path / 'logs'}", "progress_every=1"]
    p = launch.prepare(spec.parse(args), dry_run=True)
    res = subprocess.run(["bash", str(p.script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = re.findall(r"^\[launcher\] task 0: step (\d+)/40, loss (\S+) \(\d\d:\d\d:\d\d\)$", res.stdout, re.M)
    assert len(lines) >= 2, res.stdout  # about 4 s of training, a line a second
    steps = [int(step) for step, _ in lines]
    assert steps == sorted(set(steps)) and 1 <= steps[0] and steps[-1] <= 40  # each new, in order
    for step, loss in lines:
        assert float(loss) == 1.0 / int(step)  # the fake task logs loss = 1/step
    assert "task 0: step" not in (p.log_dir / "stdout" / "0.out").read_text()  # for the terminal, not the log


def test_progress_every_0_prints_none(fake_pkg, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"steps": 15, "sleep": 0.1, "value": 0}))
    args = ["script=fakepkg.work", f"config={run}", "launcher=bash", f"log_dir={tmp_path / 'logs'}", "progress_every=0"]
    p = launch.prepare(spec.parse(args), dry_run=True)
    res = subprocess.run(["bash", str(p.script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "task 0: step" not in res.stdout, res.stdout
