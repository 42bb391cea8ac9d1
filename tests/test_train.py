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
