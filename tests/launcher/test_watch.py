"""`launcher.status --watch`: the table redrawn while the metrics grow, stopping once every task finished."""

import io
import json

import yaml

from nanollama.launcher import launch, layout, spec, status


def fake_log_dir(tmp_path, n=2):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"steps": 30, "sleep": 0.0, "value": 0}))
    args = ["script=fakepkg.work", f"config={run}", "launcher=bash", f"log_dir={tmp_path / 'logs'}"]
    p = launch.prepare(spec.parse([*args, f"grid.value={list(range(n))}"]), dry_run=True)
    layout.mark_submitted(p.log_dir, "bash run.sh")
    for i in range(n):
        (p.log_dir / "stdout" / f"{i}.out").write_text(f"[launcher] task {i}: attempt at now on vm\n")
        (p.log_dir / "runs" / str(i)).mkdir()
    return p.log_dir


class Steps:
    """A stand-in for time.sleep: each call logs 10 more steps for every task; after the third, all exit 0."""

    def __init__(self, log_dir, n=2):
        self.log_dir, self.n, self.calls = log_dir, n, []

    def __call__(self, seconds):
        self.calls.append(seconds)
        step = 10 * len(self.calls)
        for i in range(self.n):
            record = {"step": step, "loss": 3.0 - step / 100 - i, "eta_s": 60.0 * (30 - step)}
            with open(self.log_dir / "runs" / str(i) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if step == 30:
                with open(self.log_dir / "stdout" / f"{i}.out", "a") as f:
                    f.write(f"[launcher] task {i}: exit code 0\n")


def test_watch_redraws_as_metrics_grow_and_stops_when_all_are_done(fake_pkg, tmp_path):
    log_dir = fake_log_dir(tmp_path)
    sleep, out = Steps(log_dir), io.StringIO()
    assert status.watch(log_dir, 2.5, out=out, sleep=sleep) == 0
    assert sleep.calls == [2.5, 2.5, 2.5]  # 4 draws: steps 0, 10, 20, then 30 with both done
    draws = out.getvalue().split(str(log_dir) + "  ")[1:]
    assert len(draws) == 4 and status.CLEAR not in out.getvalue()  # not a terminal: no escape codes
    assert "0/30" in draws[0] and "2 running" in draws[0]
    assert "10/30" in draws[1] and "20m00s" in draws[1] and "2.9000" in draws[1] and "1.9000" in draws[1]
    assert "20/30" in draws[2] and "10m00s" in draws[2]
    assert "30/30" in draws[3] and "2 done" in draws[3] and "all tasks finished" in draws[3]
    assert "10m00s" not in draws[3]  # a finished task has no ETA


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_watch_on_a_terminal_clears_and_ctrl_c_exits_0(fake_pkg, tmp_path):
    log_dir = fake_log_dir(tmp_path)
    out = Terminal()

    def interrupt(seconds):
        raise KeyboardInterrupt

    assert status.watch(log_dir, 1.0, out=out, sleep=interrupt) == 0
    assert out.getvalue().startswith(status.CLEAR) and out.getvalue().count(status.CLEAR) == 1
    out = Terminal()
    assert status.watch(log_dir, 1.0, out=out, refreshes=2, sleep=lambda s: None) == 0  # bounded: still running
    assert out.getvalue().count(status.CLEAR) == 2


def test_watch_arguments(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    assert status._parse([str(log_dir), "--watch"]) == (log_dir, 10.0)
    assert status._parse(["--watch", "3", str(log_dir)]) == (log_dir, 3.0)
    assert status._parse([str(log_dir)]) == (log_dir, None)
    for argv, match in (([str(log_dir), "--watch", "0"], "must be > 0"), ([str(log_dir), "--watch", "x"], "number")):
        assert status.main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1
    assert status.main([str(log_dir), "--watch", "1"]) == 2  # no tasks.jsonl: one line, not a loop
    assert "not a launcher log directory" in capsys.readouterr().err
