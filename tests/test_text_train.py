"""Training on text (data.source=text): the loss falls, and a resumed run sees exactly the tokens of an
uninterrupted one: in process, across a real SIGINT, and on 2 gloo ranks (with a deterministic reshard to 1)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from text_corpus import CONFIG, tiny_text, write_corpus

from nanollama.observe.metrics import MetricsFile
from nanollama.train import checkpoint
from nanollama.train.cli import main
from nanollama.utils.exit_codes import INTERRUPTED

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOLLAMA_ATTENTION": "sdpa"}

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def same_attention_in_process(monkeypatch):
    """The in-process runs use the subprocesses' attention backend: auto picks by timing, and two backends
    differ in the last bits, which a bit-exact comparison of the two would see."""
    monkeypatch.setenv("NANOLLAMA_ATTENTION", ENV["NANOLLAMA_ATTENTION"])


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsFile(run_dir / "metrics.jsonl").read() if "loss" in r}


@pytest.fixture
def corpus(tmp_path):
    write_corpus(tmp_path / "corpus", files=4, docs=60, seed=7)
    write_corpus(tmp_path / "books", files=3, kind="txt", seed=8)
    return f"[{{path: '{tmp_path / 'corpus'}', weight: 3}}, {{path: '{tmp_path / 'books'}'}}]"


def test_the_stdlib_config_trains_with_the_loss_falling(tmp_path):
    run_dir = tmp_path / "run"
    args = [str(CONFIG), f"run_dir={run_dir}", "steps=40", "log.every=1", "eval.every=0", "optim.warmup=5"]
    assert main([*args, "checkpoint.every=1000"]) == 0
    train = losses(run_dir)
    first, last = sum(train[s] for s in range(1, 6)) / 5, sum(train[s] for s in range(36, 41)) / 5
    assert first > 5.0 and last < first - 1.5, (first, last)  # from about ln 257 = 5.55 nats per byte
    evals = [r for r in MetricsFile(run_dir / "metrics.jsonl").read() if "eval_loss" in r]
    assert evals and "bayes_loss" not in evals[-1] and "excess_loss" not in evals[-1]  # text has no oracle


def test_resume_in_process_is_bit_exact_with_workers(tmp_path, corpus):
    args = [str(CONFIG), *tiny_text(corpus), "steps=16", "checkpoint.every=5", "checkpoint.keep=5", "optim.lr=1e-2"]
    assert main([*args, f"run_dir={tmp_path / 'full'}", "data.num_workers=2"]) == 0
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    for step in (16, 15):
        shutil.rmtree(checkpoint.step_dir(partial / "checkpoints", step))
    assert main([*args, f"run_dir={partial}", "data.num_workers=2"]) == 0
    assert losses(partial) == losses(tmp_path / "full") and sorted(losses(partial)) == list(range(1, 17))


def test_a_sigint_checkpoints_and_the_relaunch_matches_an_uninterrupted_run(tmp_path, corpus):
    args = [str(CONFIG), *tiny_text(corpus), "steps=120", "checkpoint.every=1000"]
    assert main([*args, f"run_dir={tmp_path / 'full'}"]) == 0
    run_dir = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "nanollama.train", *args, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    deadline = time.time() + 120
    while len(metrics.read()) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED and "stopped by SIGINT" in out, out
    stopped = checkpoint.complete_steps(run_dir / "checkpoints")
    assert len(stopped) == 1 and 5 <= stopped[0] < 120
    assert subprocess.run(cmd, env=ENV, capture_output=True).returncode == 0
    assert losses(run_dir) == losses(tmp_path / "full")


def test_two_gloo_ranks_resume_exactly_and_reshard_to_one_deterministically(tmp_path, corpus):
    args = [str(CONFIG), *tiny_text(corpus), "steps=8", "checkpoint.every=4", "checkpoint.keep=3"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]

    def two(run_dir):
        cmd = [*launcher, "-m", "nanollama.train", *args, f"run_dir={run_dir}"]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    two(tmp_path / "full")
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    shutil.rmtree(checkpoint.step_dir(partial / "checkpoints", 8))
    out = two(partial)
    assert "resumed from" in out and "at step 4" in out
    assert losses(partial) == losses(tmp_path / "full")
    resharded = []
    for name in ("one_a", "one_b"):
        shutil.copytree(partial, tmp_path / name)
        shutil.rmtree(checkpoint.step_dir(tmp_path / name / "checkpoints", 8))
        assert main([*args, f"run_dir={tmp_path / name}"]) == 0  # one plain process, in this one
        assert "text stream restarts every reader at epoch" in (tmp_path / name / "train.log").read_text()
        resharded.append(losses(tmp_path / name))
    assert resharded[0] == resharded[1] and sorted(resharded[0]) == list(range(1, 9))
