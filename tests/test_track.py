"""Trackers (log.trackers: wandb, TensorBoard) and `python -m nanollama.track`: no network anywhere.

wandb runs offline into tmp directories and is read back with wandb's own reader (`wandb leet inspect
--json`, nanollama.track.offline); TensorBoard event files with tensorboard's EventAccumulator.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_run import CONFIG, tiny

from nanollama import config
from nanollama.observe import trackers
from nanollama.observe.metrics import MetricsFile
from nanollama.track import replay
from nanollama.track.__main__ import main as track
from nanollama.train.cli import main as train
from nanollama.train.config import TrainConfig

pytest.importorskip("tensorboard")


def scalars_of(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step twice: {steps}"
    return {e.step: e.value for e in events}


def fake_run(run_dir: Path, steps: range, lr: float = 1.0) -> Path:
    """A run directory with metrics only (the uploader needs no checkpoint): loss = 10 / step, lr given."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    for step in steps:
        metrics.write({"step": step, "loss": 10 / step, "lr": lr, "host": "h", "gpus": [{"mem_used": 7}]})
    return run_dir


def train_tiny(run_dir: Path, *extra: str) -> int:
    return train([str(CONFIG), *tiny({"checkpoint.every": 3}), f"run_dir={run_dir}", "device=cpu", *extra])


# ------------------------------------------------------------------ unit


def test_scalars_flatten_numbers_and_drop_text_and_the_step():
    record = {"step": 3, "loss": 1.5, "host": "h", "ok": True, "gpus": [{"mem": 2}], "m": {"a": 1, "b": None}}
    assert trackers.scalars(record) == {"loss": 1.5, "ok": 1, "gpus.0.mem": 2, "m.a": 1}
    assert trackers.flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


def test_log_trackers_are_checked_and_default_to_jsonl_only():
    assert config.load(TrainConfig, CONFIG).log.trackers == ["jsonl"]
    with pytest.raises(config.ConfigError, match=r"log.trackers.1: must be one of jsonl, wandb, tensorboard"):
        config.load(TrainConfig, CONFIG, ["log.trackers=[wandb,mlflow]"])
    with pytest.raises(config.ConfigError, match="log.wandb.mode"):
        config.load(TrainConfig, CONFIG, ["log.wandb.mode=sometimes"])


def test_a_failing_tracker_warns_once_and_the_others_go_on():
    class Broken:
        def log(self, step, record):
            raise OSError("disk full")

        def close(self):
            pass

    class Kept(Broken):
        seen = []

        def log(self, step, record):
            self.seen.append(step)

    warnings = []
    fan = trackers.Trackers({"broken": Broken(), "kept": Kept()}, warnings.append)
    for step in (1, 2, 3):
        fan.log(step, {"loss": 1.0})
    fan.close()
    assert Kept.seen == [1, 2, 3]
    assert len(warnings) == 1 and "broken tracker failed while logging step 1" in warnings[0]


def test_a_tracker_that_cannot_start_is_one_warning(tmp_path):
    pytest.importorskip("wandb")
    options = SimpleNamespace(
        mode="bogus", project="p", entity=None, name=None, group=None, tags=[], resume="rewind", init_timeout_s=5
    )
    warnings = []
    started = trackers.build(
        SimpleNamespace(trackers=["jsonl", "wandb"], wandb=options), tmp_path, {}, 0, warnings.append
    )
    assert started.trackers == {}
    assert len(warnings) == 1 and warnings[0].startswith("log.trackers: wandb could not start")


def test_without_wandb_or_tensorboard_installed_training_is_told_what_to_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    warnings = []
    log_cfg = SimpleNamespace(trackers=["wandb", "tensorboard"], wandb=SimpleNamespace(mode="offline"))
    assert trackers.build(log_cfg, tmp_path, {}, 0, warnings.append).trackers == {}
    assert len(warnings) == 2 and all("not installed" in w and "nanollama[track]" in w for w in warnings)
    run = fake_run(tmp_path / "run", range(1, 3))
    assert track(["wandb", str(run), "--offline"]) == 2 and track(["tensorboard", str(run)]) == 2
    assert capsys.readouterr().err.count("nanollama[track]") == 2


def test_sweep_tasks_are_grouped_by_the_launchers_name(tmp_path):
    task = tmp_path / "logs" / "sweep7" / "runs" / "3"
    task.mkdir(parents=True)
    (tmp_path / "logs" / "sweep7" / "launcher.yaml").write_text("launcher:\n  name: lr_grid\n")
    assert trackers.sweep_name(task) == "lr_grid" and trackers.default_name(task) == "lr_grid-3"
    assert trackers.sweep_name(tmp_path) is None and trackers.default_name(tmp_path) == tmp_path.name


def test_replay_reads_every_source_and_skips_what_is_absent_or_torn(tmp_path):
    run = fake_run(tmp_path / "run", range(1, 3))
    (run / "probes.jsonl").write_text(
        json.dumps({"step": 2, "layer": "0", "node": "h", "acc": 0.5, "seq_len": 16}) + "\n" + '{"step": 2, "la'
    )
    (run / "profile.jsonl").write_text('{"schema": 1}\n{"step": 1, "fwd_s": 0.25}\n')
    (run / "profile" / "step_2").mkdir(parents=True)
    (run / "profile" / "step_2" / "rank0.json.gz").write_bytes(b"")
    got = replay.read(run)
    assert got["metrics"] == {
        1: {"loss": 10.0, "lr": 1.0, "gpus.0.mem_used": 7},
        2: {"loss": 5.0, "lr": 1.0, "gpus.0.mem_used": 7},
    }
    assert got["probes"] == {2: {"probe/h/0/acc": 0.5}} and got["profile"] == {1: {"profile/fwd_s": 0.25}}
    assert got["evaluations"] == {}
    assert [p.name for p in replay.traces(run)] == ["rank0.json.gz"]


# ------------------------------------------------------------------ the uploader, TensorBoard


def test_tensorboard_upload_is_incremental_and_idempotent(tmp_path, capsys):
    run = fake_run(tmp_path / "run", range(1, 4))
    assert track(["tensorboard", str(run)]) == 0
    assert scalars_of(run / "tb", "loss") == pytest.approx({1: 10.0, 2: 5.0, 3: 10 / 3})
    files = sorted((run / "tb").iterdir())
    assert track(["tensorboard", str(run)]) == 0
    assert "up to date" in capsys.readouterr().out and sorted((run / "tb").iterdir()) == files  # nothing added
    fake_run(run, range(4, 6))  # the run went on
    (run / "probes.jsonl").write_text(json.dumps({"step": 2, "layer": "0", "node": "h", "acc": 0.75}) + "\n")
    assert track(["tensorboard", str(run)]) == 0
    assert scalars_of(run / "tb", "loss") == pytest.approx({s: 10 / s for s in range(1, 6)})
    assert scalars_of(run / "tb", "probe/h/0/acc") == {2: 0.75}  # late, below steps already written


def test_bad_directories_are_one_line_and_exit_2(tmp_path, capsys):
    assert track(["tensorboard", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere: neither a run directory" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert track(["tensorboard", str(tmp_path / "empty")]) == 2
    assert "no metrics" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "tb").exists() and not (tmp_path / "empty" / "track").exists()


@pytest.mark.slow
def test_live_tensorboard_resume_purges_the_steps_past_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert train_tiny(run, "steps=6", "log.trackers=[tensorboard]") == 0
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # resume from step 3 after logging up to 6
    assert train_tiny(run, "steps=8", "optim.lr=0.002", "log.trackers=[tensorboard]") == 0
    logged = {r["step"]: r["lr"] for r in MetricsFile(run / "metrics.jsonl").read() if "lr" in r}
    assert sorted(logged) == list(range(1, 9))
    assert scalars_of(run / "tb", "lr") == pytest.approx(logged)  # each step once, the resumed values


# ------------------------------------------------------------------ wandb (offline)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from nanollama.track import offline

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    yield lambda run_id: offline.history(tmp_path / "wandb_dir", run_id)
    wandb_teardown()


def wandb_teardown() -> None:
    """wandb keeps process-wide settings (mode, home, base url) from its first run: start each test afresh."""
    import wandb

    wandb.teardown()


def run_id(run: Path) -> str:
    return json.loads((run / "track" / "wandb.json").read_text())["id"]


@pytest.mark.slow
def test_live_wandb_resume_rewinds_so_each_step_is_held_once_with_the_resumed_values(tmp_path, offline):
    run = tmp_path / "run"
    on = ["log.trackers=[wandb]", "log.wandb.tags=[t1]"]
    assert train_tiny(run, "steps=6", *on) == 0
    first, first_lr = run_id(run), {r["step"]: r["lr"] for r in MetricsFile(run / "metrics.jsonl").read() if "lr" in r}
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # resume from step 3 after logging up to 6
    assert train_tiny(run, "steps=8", "optim.lr=0.002", *on) == 0
    assert run_id(run) == first  # the same wandb run
    logged = {r["step"]: r["lr"] for r in MetricsFile(run / "metrics.jsonl").read() if "lr" in r}
    held = offline(first)
    assert sorted(held) == list(range(1, 9))
    assert {s: row["lr"] for s, row in held.items()} == pytest.approx(logged)
    assert "eval_loss" not in held[6] and "eval_loss" in held[8]  # the first run's final eval was rewound away
    assert held[5]["lr"] != pytest.approx(first_lr[5])  # lr changed at the relaunch: the resumed values differ


@pytest.mark.slow
def test_wandb_init_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    assert (
        train_tiny(run, "steps=3", "log.trackers=[wandb]", "log.wandb.mode=online", "log.wandb.init_timeout_s=5") == 0
    )
    assert max(r["step"] for r in MetricsFile(run / "metrics.jsonl").read()) == 3
    lines = [line for line in (run / "train.log").read_text().splitlines() if "tracker" in line or "wandb:" in line]
    assert len(lines) == 1 and "wandb could not start" in lines[0], lines
    wandb_teardown()


@pytest.mark.slow
def test_wandb_upload_of_a_sweep_is_grouped_incremental_and_idempotent(tmp_path, offline, capsys):
    log_dir = tmp_path / "logs" / "grid"
    tasks = []
    for i, lr in enumerate((1.0, 2.0)):
        fake_run(log_dir / "runs" / str(i), range(1, 4), lr=lr)
        tasks.append(json.dumps({"id": i, "grid": {"optim.lr": lr}, "run_dir": str(log_dir / "runs" / str(i))}))
    (log_dir / "tasks.jsonl").write_text("\n".join(tasks) + "\n")
    (log_dir / "launcher.yaml").write_text("launcher:\n  name: grid\n")
    trace = log_dir / "runs" / "0" / "profile" / "step_2" / "rank0.json.gz"
    trace.parent.mkdir(parents=True)
    trace.write_bytes(b"\x1f\x8b")

    assert track(["wandb", str(log_dir), "--offline", "--project", "proj"]) == 0
    segments = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    ids = [run_id(log_dir / "runs" / str(i)) for i in (0, 1)]
    for i, lr in enumerate((1.0, 2.0)):
        held = offline(ids[i])
        assert {s: row["lr"] for s, row in held.items()} == {1: lr, 2: lr, 3: lr}
    from nanollama.track.offline import records

    for seg in segments:
        recs = records(next(seg.glob("*.wandb")))
        run = next(r["run"] for r in recs if r["type"] == "run")
        assert run["run_group"] == "grid" and run["project"] == "proj" and run["display_name"].startswith("grid-")
        assert sum(r["type"] == "artifact" for r in recs) == (1 if run["run_id"] == ids[0] else 0)

    capsys.readouterr()
    assert track(["wandb", str(log_dir), "--offline"]) == 0  # nothing new: no run opened at all
    assert capsys.readouterr().out.count("up to date") == 2
    assert len(list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))) == 2

    fake_run(log_dir / "runs" / "0", range(4, 6))  # task 0 went on
    assert track(["wandb", str(log_dir), "--offline"]) == 0
    from nanollama.track.offline import segments

    newest = segments(tmp_path / "wandb_dir", ids[0])[-1]
    assert sorted(newest["rows"]) == [4, 5]  # only the new steps
    assert not any(r["type"] == "artifact" for r in records(newest["file"]))  # and no trace again
    assert sorted(offline(ids[0])) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_wandb_upload_rewinds_for_a_late_probe_and_a_rewritten_metrics_file(tmp_path, offline):
    run = fake_run(tmp_path / "run", range(1, 5))
    assert track(["wandb", str(run), "--offline"]) == 0
    (run / "probes.jsonl").write_text(json.dumps({"step": 2, "layer": "1", "node": "h", "acc": 0.5}) + "\n")
    assert track(["wandb", str(run), "--offline"]) == 0
    held = offline(run_id(run))
    assert sorted(held) == [1, 2, 3, 4] and held[2]["probe/h/1/acc"] == 0.5 and held[4]["loss"] == 2.5
    MetricsFile(run / "metrics.jsonl").truncate_after(2)  # a resume from step 2, with other values
    fake_run(run, range(3, 4), lr=9.0)
    assert track(["wandb", str(run), "--offline"]) == 0
    held = offline(run_id(run))
    assert sorted(held) == [1, 2, 3] and held[3]["lr"] == 9.0 and held[1]["lr"] == 1.0


@pytest.mark.slow
def test_only_rank_0_tracks_under_torchrun(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "NANOLLAMA_ATTENTION": "sdpa"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    run = tmp_path / "run"
    cmd = [*launcher, "-m", "nanollama.train", str(CONFIG), *tiny({"data.batch_size": 4, "eval.batches": 1})]
    cmd += [f"run_dir={run}", "device=cpu", "steps=4", "log.trackers=[tensorboard]"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(scalars_of(run / "tb", "loss")) == [1, 2, 3, 4]


@pytest.mark.slow
def test_fork_mode_starts_a_new_run_from_the_checkpoint_step(tmp_path, offline):
    options = SimpleNamespace(
        mode="offline", project="p", entity=None, name=None, group=None, tags=[], resume="fork", init_timeout_s=30
    )
    run = tmp_path / "run"
    first = trackers.WandbTracker(run, options, {"optim": {"lr": 1}})
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.close()
    second = trackers.WandbTracker(run, options, {}, resume_step=2)  # resumed from step 2 after logging 4
    second.log(3, {"loss": 30.0})
    second.close()
    assert second.id != first.id and run_id(run) == second.id
    assert {s: row["loss"] for s, row in offline(second.id).items()} == {1: 1.0, 2: 2.0, 3: 30.0}
    assert sorted(offline(first.id)) == [1, 2, 3, 4]  # the original run is left as it was
