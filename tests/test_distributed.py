"""FSDP2 training under torchrun with 2 gloo processes on the CPU: parity, resume, resharding, faults."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import tiny, wait_for_steps

from nanollama.observe.metrics import MetricsFile
from nanollama.train import checkpoint

ROOT = Path(__file__).parents[1]
DEBUG = ROOT / "configs" / "gssm" / "debug.yaml"
TINY = tiny({"model.n_layers": 2, "data.batch_size": 4, "eval.batches": 1})
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOLLAMA_ATTENTION": "sdpa"}

pytestmark = [
    pytest.mark.slow,  # several processes each: outside the quick inner loop (pytest -m "not slow")
    pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux"),
]


def command(run_dir: Path, nproc: int | None, *extra: str) -> list[str]:
    train = ["-m", "nanollama.train", str(DEBUG), *TINY, f"run_dir={run_dir}", *extra]
    if nproc is None:  # a plain single process, no torch.distributed at all
        return [sys.executable, *train]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    return [sys.executable, *launcher, *train]


def train(run_dir: Path, nproc: int | None, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(run_dir, nproc, *extra), env=ENV, capture_output=True, text=True, timeout=300)
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsFile(run_dir / "metrics.jsonl").read() if "loss" in r}


@pytest.mark.parametrize("mask", ["causal", "prefix_lm"])
def test_two_ranks_match_one_rank_with_twice_the_accumulation(tmp_path, mask):
    two = train(tmp_path / "two", 2, "steps=5", "optim.accum_steps=1", f"data.mask={mask}")
    one = train(tmp_path / "one", None, "steps=5", "optim.accum_steps=2", f"data.mask={mask}")
    assert two.returncode == 0, two.stdout + two.stderr
    assert one.returncode == 0, one.stdout + one.stderr
    a, b = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert "world size 2 (FSDP2)" in two.stdout
    assert "tokens per step: 128" in two.stdout and "tokens per step: 128" in one.stdout
    record = [r for r in MetricsFile(tmp_path / "two" / "metrics.jsonl").read() if "loss" in r][-1]
    assert record["host"] and record["rss_bytes"] > 0
    assert record["mfu"] is None and record["cuda_max_allocated"] is None and record["gpus"] is None  # no GPU


def test_resume_on_two_ranks_is_bit_exact_and_resharding_to_one_rank_works(tmp_path):
    args = ("steps=8", "checkpoint.every=4", "checkpoint.keep=3")
    full = train(tmp_path / "full", 2, *args)
    assert full.returncode == 0, full.stdout + full.stderr
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    shutil.rmtree(checkpoint.step_dir(partial / "checkpoints", 8))  # as if it died after step 4's checkpoint
    resumed = train(partial, 2, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert losses(partial) == losses(tmp_path / "full")  # exact equality after the restart

    resharded = tmp_path / "resharded"
    shutil.copytree(partial, resharded)
    shutil.rmtree(checkpoint.step_dir(resharded / "checkpoints", 8))
    one = train(resharded, None, *args)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "resharded from world size 2 to 1" in one.stdout
    after = losses(resharded)
    assert sorted(after) == list(range(1, 9))
    # the model and optimizer came back: the first step after resuming continues the trained model
    assert abs(after[5] - losses(tmp_path / "full")[5]) < 0.1


def workers(launcher_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_preemption_signal_checkpoints_every_rank_and_resume_matches(tmp_path):
    args = ("steps=300", "checkpoint.every=1000")
    reference = train(tmp_path / "reference", 2, "steps=30", "checkpoint.every=1000", "optim.schedule=constant")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(
        command(run_dir, 2, *args, "optim.schedule=constant"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_steps(run_dir, 3, proc)
    ranks = workers(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGUSR1)  # one rank is told: both must stop at the same step
    out, _ = proc.communicate(timeout=120)
    assert "stopped by" in out, out
    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    assert len(steps) == 1 and 3 <= steps[0] < 300, out
    assert checkpoint.info(checkpoint.step_dir(run_dir / "checkpoints", steps[0]))["world_size"] == 2
    stopped = steps[0]
    if stopped < 30:
        resumed = train(run_dir, 2, "steps=30", "checkpoint.every=1000", "optim.schedule=constant")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert losses(run_dir) == losses(tmp_path / "reference")


def test_a_crashing_rank_ends_the_job_within_bounded_time(tmp_path):
    run_dir = tmp_path / "crash"
    proc = subprocess.Popen(
        command(run_dir, 2, "steps=100000", "parallel.timeout_s=20"),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_steps(run_dir, 2, proc)
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    start = time.time()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - start < 60
    assert "Traceback" in out or "failed" in out.lower()


def test_async_save_and_evaluation_protected_checkpoints(tmp_path):
    run_dir = tmp_path / "async"
    args = (
        "steps=6",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        "checkpoint.eval_every=3",
        "checkpoint.async_save=true",
    )
    proc = train(run_dir, None, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = run_dir / "checkpoints"
    assert checkpoint.complete_steps(root) == [3, 6]  # keep=1, but step 3 waits for its evaluation
    assert [p.name for p in checkpoint.pending_evaluation(root)] == ["step_00000003", "step_00000006"]
    out = subprocess.run(
        [sys.executable, "-m", "nanollama.evaluate", str(run_dir)], env=ENV, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "step 3" in out.stdout and "excess_loss" in out.stdout
    assert checkpoint.pending_evaluation(root) == []
    evals = MetricsFile(run_dir / "evaluations.jsonl").read()
    assert [r["step"] for r in evals] == [3, 6] and all(r["excess_loss"] > -0.05 for r in evals)
    proc = train(run_dir, None, *args[1:], "steps=7")  # the next prune may now delete step 3
    assert proc.returncode == 0 and checkpoint.complete_steps(root) == [7]


def test_async_save_on_two_ranks_and_a_kill_9_mid_save_resumes_from_the_last_complete_one(tmp_path):
    """The background save has a process group of its own: on the training group its collectives
    clashed with FSDP's (a gloo mismatch on rank 1, or a hang) at the first save."""
    common = ("checkpoint.every=4", "checkpoint.keep=5", "checkpoint.async_save=true", "optim.schedule=constant")
    reference = train(tmp_path / "reference", 2, "steps=24", *common)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    root = tmp_path / "reference" / "checkpoints"
    assert checkpoint.complete_steps(root) == [8, 12, 16, 20, 24]
    for step in checkpoint.complete_steps(root):
        assert checkpoint.verify(checkpoint.step_dir(root, step)) is None
        assert checkpoint.info(checkpoint.step_dir(root, step))["world_size"] == 2

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        command(run_dir, 2, "steps=100000", *common),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_steps(run_dir, 10, proc)  # step 4 committed at step 8, whose write is in flight or pending
    for pid in [*workers(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    root = run_dir / "checkpoints"
    complete = checkpoint.complete_steps(root)
    assert complete and all(step % 4 == 0 for step in complete)
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-step_")]  # the save it was killed in
    last = complete[-1]
    if last < 24:
        resumed = train(run_dir, 2, "steps=24", *common)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert (
            f"step_{last:08d} at step {last}" in resumed.stdout and "removed the leftover .tmp-step_" in resumed.stdout
        )
        assert losses(run_dir) == losses(tmp_path / "reference")  # bit-exact
        assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_two_ranks_agree_on_the_fallback_from_a_damaged_checkpoint(tmp_path):
    args = ("steps=8", "checkpoint.every=4", "checkpoint.keep=3")
    full = train(tmp_path / "full", 2, *args)
    assert full.returncode == 0, full.stdout + full.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "full", damaged)
    shard = checkpoint.step_dir(damaged / "checkpoints", 8) / "dcp" / "__1_0.distcp"  # rank 1's shard
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    resumed = train(damaged, 2, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count("damaged checkpoint:") == 1 and "__1_0.distcp: CRC-32" in resumed.stdout
    assert "falling back to step_00000004" in resumed.stdout and "step_00000004 at step 4" in resumed.stdout
    assert losses(damaged) == losses(tmp_path / "full")  # both ranks resumed from step 4, bit-exactly
    assert (damaged / "checkpoints" / "damaged-step_00000008").is_dir()
