import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import tiny

from nanollama.models.transformer import Transformer
from nanollama.observe.metrics import MetricsFile
from nanollama.train import checkpoint
from nanollama.train.cli import main, parse
from nanollama.train.trainer import Trainer
from nanollama.utils.exit_codes import INTERRUPTED as EXIT_INTERRUPTED
from nanollama.utils.exit_codes import NONFINITE as EXIT_NONFINITE

ROOT = Path(__file__).parents[1]
DEBUG = ROOT / "configs" / "gssm" / "debug.yaml"
TINY = tiny({"eval.every": 5})


def run(tmp_path, *extra, name="run") -> tuple[int, list[dict]]:
    run_dir = tmp_path / name
    code = main([str(DEBUG), *TINY, f"run_dir={run_dir}", *extra])
    return code, MetricsFile(run_dir / "metrics.jsonl").read()


def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_short_run_lowers_the_loss_and_writes_the_run_directory(tmp_path):
    code, records = run(tmp_path, "steps=60", "optim.lr=1e-2", "checkpoint.every=25", "checkpoint.keep=2")
    assert code == 0
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    for r in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.3, (first, last)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5 * i for i in range(1, 13)]
    run_dir = tmp_path / "run"
    assert checkpoint.complete_steps(run_dir / "checkpoints") == [50, 60]  # keep=2
    assert parse([str(run_dir / "config.yaml")]).steps == 60
    log = (run_dir / "train.log").read_text()
    assert "host " in log and "rss" in log and "step     60/60" in log


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    args = ("steps=20", "checkpoint.every=7", "checkpoint.keep=5")
    _, full = run(tmp_path, *args, name="full")
    _, partial = run(tmp_path, *args, name="partial")
    # Pretend the run died after step 14: drop the later checkpoints, then relaunch the same command.
    ckpts = tmp_path / "partial" / "checkpoints"
    shutil.rmtree(checkpoint.step_dir(ckpts, 20))
    code, resumed = run(tmp_path, *args, name="partial")
    assert code == 0
    assert losses(resumed) == losses(full)  # exact float equality, steps 1..20
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 21))  # no duplicated records
    assert losses(partial) == losses(full)


def test_raising_steps_at_relaunch_trains_on(tmp_path):
    run(tmp_path, "steps=6", "optim.schedule=constant")
    code, records = run(tmp_path, "steps=9", "optim.schedule=constant")
    assert code == 0 and sorted(losses(records)) == list(range(1, 10))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = Trainer.loss_on

    def poisoned(self, tokens):
        loss = real(self, tokens)
        return loss * float("nan") if self.step == 5 else loss

    monkeypatch.setattr(Trainer, "loss_on", poisoned)
    code, records = run(tmp_path, "steps=20", "checkpoint.every=2")
    assert code == EXIT_NONFINITE
    ckpts = tmp_path / "run" / "checkpoints"
    assert checkpoint.complete_steps(ckpts) == [2, 4]
    assert max(losses(records)) <= 5
    model = Transformer(parse([str(tmp_path / "run" / "config.yaml")]).model)
    checkpoint.load_model(checkpoint.latest(ckpts), model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_half_written_checkpoints_are_ignored(tmp_path):
    run(tmp_path, "steps=4", "checkpoint.every=2")
    ckpts = tmp_path / "run" / "checkpoints"
    # a crash mid-write leaves a temporary directory, or (on odd filesystems) a step without its marker
    (ckpts / ".tmp-step_00000009-1").mkdir()
    (ckpts / ".tmp-step_00000009-1" / "model.pt").write_bytes(b"garbage")
    unmarked = checkpoint.step_dir(ckpts, 8)
    unmarked.mkdir()
    (unmarked / "model.pt").write_bytes(b"garbage")
    assert checkpoint.latest(ckpts) == checkpoint.step_dir(ckpts, 4)
    code, records = run(tmp_path, "steps=6", "checkpoint.every=2")  # resumes from step 4, not 8 or 9
    assert code == 0 and sorted(losses(records)) == list(range(1, 7))


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_relaunch_matches_an_uninterrupted_run(tmp_path):
    args = [*TINY, "steps=150", "checkpoint.every=1000", "log.every=1"]
    _, full = run(tmp_path, *args[len(TINY) :], name="full")
    run_dir = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "nanollama.train", str(DEBUG), *args, f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    deadline = time.time() + 120
    while len(metrics.read()) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "Traceback" not in out and "stopped by SIGINT" in out
    stopped_at = checkpoint.complete_steps(run_dir / "checkpoints")
    assert len(stopped_at) == 1 and 5 <= stopped_at[0] < 150
    code = subprocess.run(cmd, env=env, capture_output=True).returncode
    assert code == 0
    assert losses(metrics.read()) == losses(full)


def test_files_source_resumes_bitwise_with_workers(tmp_path):
    from nanollama.data.gssm.__main__ import main as write_files

    data = tmp_path / "data"
    assert write_files([str(DEBUG), *TINY, "--out", str(data), "--train", "100", "--test", "16"]) == 0
    args = ("steps=16", "checkpoint.every=5", "checkpoint.keep=5", "data.source=files", f"data.path={data}")
    _, full = run(tmp_path, *args, name="full")  # 12 batches of 8 per epoch: the run crosses an epoch
    _, partial = run(tmp_path, *args, "data.num_workers=2", name="partial")
    import shutil

    shutil.rmtree(checkpoint.step_dir(tmp_path / "partial" / "checkpoints", 16))
    shutil.rmtree(checkpoint.step_dir(tmp_path / "partial" / "checkpoints", 15))
    code, resumed = run(tmp_path, *args, name="partial")
    assert code == 0 and losses(resumed) == losses(full) == losses(partial)
    code = main([str(DEBUG), *TINY, f"run_dir={tmp_path / 'x'}", "data.source=files", f"data.path={tmp_path}"])
    assert code == 2


@pytest.mark.parametrize("mask", ["prefix_lm", "document"])
def test_masked_training_learns_and_resumes_exactly(tmp_path, mask):
    args = (f"data.mask={mask}", "data.doc_min=4", "steps=40", "optim.lr=1e-2", "checkpoint.every=20")
    code, full = run(tmp_path, *args, "eval.every=20", name="full")
    assert code == 0
    cfg = parse([str(tmp_path / "full" / "config.yaml")])
    assert cfg.model.vocab_size == cfg.data.gssm.vocab_size + (mask == "document")  # the end token
    train = [r["loss"] for r in full if "loss" in r]
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.3
    evals = [r for r in full if "eval_loss" in r]
    assert all(0 < r["bayes_loss"] < r["eval_loss"] + 0.05 for r in evals)
    # resume from step 20 equals the uninterrupted run
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(checkpoint.step_dir(tmp_path / "resumed" / "checkpoints", 40))
    code, resumed = run(tmp_path, *args, "eval.every=20", name="resumed")
    assert code == 0 and losses(resumed) == losses(full)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    code, records = run(tmp_path, f"precision={precision}", "steps=30", "optim.lr=1e-2")
    assert code == 0
    train = [r["loss"] for r in records if "loss" in r]
    assert all(map(math.isfinite, train)) and sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.2


@pytest.mark.parametrize(
    "setting, tolerance",
    [
        ("parallel.activation_checkpointing=full", 1e-6),
        ("parallel.activation_checkpointing=selective", 1e-6),
        ("parallel.compile=true", 1e-4),  # inductor may reorder float sums
    ],
)
def test_checkpointing_and_compile_keep_the_losses(tmp_path, monkeypatch, setting, tolerance):
    monkeypatch.setenv("NANOLLAMA_ATTENTION", "sdpa")  # the same attention backend in both runs
    _, plain = run(tmp_path, "steps=4", name="plain")
    _, changed = run(tmp_path, "steps=4", setting, name="changed")
    a, b = losses(plain), losses(changed)
    assert sorted(a) == sorted(b) == list(range(1, 5))
    assert all(abs(a[s] - b[s]) < tolerance for s in a), (a, b)


def test_activation_checkpointing_recomputes_in_backward(tmp_path):
    """Full checkpointing runs each block's forward twice per step (once more in backward)."""
    cfg = parse([str(DEBUG), *TINY, f"run_dir={tmp_path}", "parallel.activation_checkpointing=full"])
    trainer = Trainer(cfg)
    calls = []
    for block in trainer.model.layers:
        block.attention.register_forward_pre_hook(lambda *args: calls.append(1))
    trainer.train_step()
    assert len(calls) == 2 * cfg.model.n_layers
    assert trainer.hardware_flops_per_token > trainer.flops_per_token


def test_a_relaunch_cannot_change_the_model_or_data_of_a_run(tmp_path, capsys):
    run(tmp_path, "steps=3")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    for change, field in [("model.dim=64", "model.dim"), ("data.batch_size=4", "data.batch_size"), ("seed=5", "seed")]:
        code, _ = run(tmp_path, "steps=6", change)
        assert code == 2
        assert capsys.readouterr().err.startswith(f"error: {field}: is ")
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # the run still describes its checkpoint
    code, records = run(tmp_path, "steps=6", "optim.lr=5e-4", "data.num_workers=1")  # allowed changes
    assert code == 0 and sorted(losses(records)) == list(range(1, 7))


def test_a_run_dir_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main([str(DEBUG), *TINY, f"run_dir={tmp_path / 'file' / 'run'}"]) == 2
    assert capsys.readouterr().err.startswith("error: run_dir: cannot create")


def test_a_nonfinite_gradient_never_reaches_a_checkpoint(tmp_path):
    code, _ = run(tmp_path, "steps=30", "optim.lr=1e30", "optim.warmup=0", "optim.grad_clip=0", "checkpoint.every=1")
    assert code == EXIT_NONFINITE
    ckpts = tmp_path / "run" / "checkpoints"
    model = Transformer(parse([str(tmp_path / "run" / "config.yaml")]).model)
    for step in checkpoint.complete_steps(ckpts):
        checkpoint.load_model(checkpoint.step_dir(ckpts, step), model)
        assert all(torch.isfinite(p).all() for p in model.parameters()), step


@pytest.mark.slow
def test_a_metrics_line_cut_by_a_crash_does_not_stop_the_resume(tmp_path):
    run(tmp_path, "steps=4", "checkpoint.every=2")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    code, records = run(tmp_path, "steps=6", "checkpoint.every=2")
    assert code == 0 and sorted(losses(records)) == list(range(1, 7))


# ----------------------------------------------------------------------------- relaunch, resources, progress


def test_a_changed_graph_names_the_first_differing_field_in_one_line(tmp_path, capsys):
    run(tmp_path, "steps=2")
    code, _ = run(tmp_path, "steps=3", "data.gssm.nodes.0.state_dim=5")
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: data.gssm.nodes.0.state_dim: is 5 but the run in ") and "trained with 4;" in err
    assert err.count("\n") == 1 and "clock" not in err  # not both whole node lists


def test_a_relaunch_logs_what_changed_and_keeps_every_config(tmp_path):
    import yaml

    run(tmp_path, "steps=2")
    code, _ = run(tmp_path, "steps=3", "optim.lr=5e-4")
    assert code == 0
    run_dir = tmp_path / "run"
    log = (run_dir / "train.log").read_text()
    assert "changed at this relaunch: steps: 2 -> 3" in log
    assert "changed at this relaunch: optim.lr: 0.003 -> 0.0005" in log
    history = sorted(p.name for p in (run_dir / "configs").iterdir())
    assert history == ["config.1.yaml", "config.2.yaml"]
    assert yaml.safe_load((run_dir / "configs" / "config.1.yaml").read_text())["optim"]["lr"] == 0.003
    assert yaml.safe_load((run_dir / "configs" / "config.2.yaml").read_text())["optim"]["lr"] == 0.0005
    run(tmp_path, "steps=3", "optim.lr=5e-4")  # the same config again: nothing new to keep
    assert len(list((run_dir / "configs").iterdir())) == 2


def test_warmup_longer_than_the_run_warns(tmp_path):
    run(tmp_path, "steps=3", "optim.warmup=5")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "warning: optim.warmup=5 >= steps=3: the learning rate rises for the whole run" in log
    run(tmp_path, "steps=4", "optim.warmup=2", name="short")
    assert "warning" not in (tmp_path / "short" / "train.log").read_text()


@pytest.mark.parametrize("damage", ["missing", "empty", "unreadable"])
def test_a_lost_config_yaml_is_checked_against_the_checkpoint_and_restored(tmp_path, capsys, damage):
    run(tmp_path, "steps=2")
    path = tmp_path / "run" / "config.yaml"
    original = path.read_text()
    if damage == "missing":
        path.unlink()
    else:
        path.write_text("" if damage == "empty" else "model: [")
    code, _ = run(tmp_path, "steps=3", "model.dim=64")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: model.dim: is 64 but the run in ") and f"config.yaml is {damage}" in err
    assert "relaunch with it to restore config.yaml" in err
    left = {"missing": None, "empty": "", "unreadable": "model: ["}[damage]
    assert (path.read_text() if path.exists() else None) == left  # the refused launch wrote nothing
    code, records = run(tmp_path, "steps=3")  # the original command still works, and restores config.yaml
    assert code == 0 and sorted(losses(records)) == [1, 2, 3]
    assert path.read_text() == original.replace("steps: 2", "steps: 3")
    assert f"config.yaml was {damage}" in (tmp_path / "run" / "train.log").read_text()


def test_a_lost_config_yaml_without_a_copy_in_the_checkpoint_is_refused(tmp_path, capsys):
    run(tmp_path, "steps=2")
    ckpt = checkpoint.latest(tmp_path / "run" / "checkpoints")
    state = torch.load(ckpt / "train_state_rank0.pt", weights_only=False)
    del state["config"]  # a checkpoint written before checkpoints carried the config
    torch.save(state, ckpt / "train_state_rank0.pt")
    (tmp_path / "run" / "config.yaml").unlink()
    code, _ = run(tmp_path, "steps=3")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: run_dir: ") and "config.yaml is missing" in err
    assert "holds no copy of the config" in err and not (tmp_path / "run" / "config.yaml").exists()


def test_thread_count_is_chosen_from_available_cores_and_local_ranks(monkeypatch):
    from nanollama.train import resources

    assert 1 <= resources.available_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(resources, "available_cores", lambda: 6)
    assert resources.choose_threads(3, {"OMP_NUM_THREADS": "5"}) == (3, "threads")
    assert resources.choose_threads(None, {"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    assert resources.choose_threads(None, {"LOCAL_WORLD_SIZE": "2"}) == (3, "6 available cores / 2 local ranks")
    assert resources.choose_threads(None, {"LOCAL_WORLD_SIZE": "8"})[0] == 1
    assert resources.choose_threads(None, {})[0] == 6


def test_the_trainer_sets_and_logs_its_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        code, _ = run(tmp_path, "steps=1", "threads=2")
        assert code == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert "threads: 2 torch intra-op threads per process (threads)" in (tmp_path / "run" / "train.log").read_text()


def test_a_model_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path, capsys):
    from nanollama import models
    from nanollama.train import resources

    cfg = parse([str(DEBUG), *TINY, "model.dim=65536", "model.n_layers=64"])
    params, need = resources.model_bytes(models.get("transformer"), cfg.model)
    assert params > 3e12 and need >= 16 * params  # counted on the meta device: nothing allocated
    code, _ = run(tmp_path, "model.dim=65536", "model.n_layers=64")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model: ") and "GiB is available" in err and err.count("\n") == 1


def test_progress_eta_and_the_live_line_only_on_a_terminal():
    import io

    from nanollama.train.progress import Progress, format_eta

    assert [format_eta(s) for s in (None, 42.4, 185, 3725)] == ["?", "42s", "3m05s", "1h02m"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen, pipe = Terminal(), io.StringIO()
    live, quiet = Progress(0, 10, stream=screen), Progress(0, 10, stream=pipe)
    assert live.live and not quiet.live and live.eta() is None
    for p in (live, quiet):
        p.begin -= 4.0  # 4 s for the first 2 steps: 8 steps left take 16 s
        p.update(2, 1234.0)
    assert 15.5 < live.eta() < 17 and pipe.getvalue() == ""
    assert screen.getvalue().startswith("\rstep      2/10 | tok/s 1,234 | eta 16s")
    live.clear()
    assert screen.getvalue().endswith("\r") and not live._shown


def test_log_lines_carry_an_eta_and_files_get_no_live_line(tmp_path):
    run(tmp_path, "steps=3")
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step      3/3 |" in log and "| eta 0s" in log and "\r" not in log
    records = [r for r in MetricsFile(tmp_path / "run" / "metrics.jsonl").read() if "loss" in r]
    assert records[-1]["eta_s"] == 0.0 and records[0]["eta_s"] > 0


def test_eval_every_marks_every_nth_checkpoint(tmp_path):
    code, _ = run(tmp_path, "steps=12", "checkpoint.every=2", "checkpoint.eval_every=2", "checkpoint.keep=1")
    assert code == 0
    ckpts = tmp_path / "run" / "checkpoints"
    # checkpoints at steps 2, 4, ..., 12: the 2nd, 4th and 6th are marked (not every even step), kept until evaluated
    assert [checkpoint.info(p)["step"] for p in checkpoint.pending_evaluation(ckpts)] == [4, 8, 12]
    assert checkpoint.complete_steps(ckpts) == [4, 8, 12]


def test_a_run_from_before_the_config_history_keeps_its_first_config(tmp_path):
    import yaml

    run(tmp_path, "steps=2")
    shutil.rmtree(tmp_path / "run" / "configs")  # as a run directory written before the history existed
    run(tmp_path, "steps=3", "optim.lr=5e-4")
    configs = tmp_path / "run" / "configs"
    assert [yaml.safe_load((configs / f"config.{n}.yaml").read_text())["optim"]["lr"] for n in (1, 2)] == [3e-3, 5e-4]
