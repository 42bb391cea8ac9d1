"""Tensor (and sequence) parallelism on a ("dp", "tp") mesh, gloo on the CPU: parity with one process,
resume across mesh shapes, refusals. The multi-process ones are slow: each launch does several checks."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import ENV, ROOT, losses
from tiny_run import tiny

from nanollama import models
from nanollama.distributed import init, tensor_parallel
from nanollama.models import registry
from nanollama.models.transformer import SPEC, TransformerConfig
from nanollama.models.transformer.parallelize import qkv_row_order
from nanollama.observe.metrics import MetricsFile
from nanollama.train import checkpoint
from nanollama.train.cli import main
from nanollama.utils.checks import ConfigError

DEBUG = ROOT / "configs" / "gssm" / "debug.yaml"
# GQA (4 query heads, 2 kv heads) in every run, so each tp=2 parity check is also a GQA check.
TINY = tiny({"model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "data.batch_size": 4, "eval.batches": 1})
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")


def train(run_dir: Path, nproc: int | None, *extra: str) -> subprocess.CompletedProcess:
    args = ["-m", "nanollama.train", str(DEBUG), *TINY, f"run_dir={run_dir}", *extra]
    if nproc is not None:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0"]
        args = [*launcher, *args]
    proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in MetricsFile(run_dir / "metrics.jsonl").read() if "grad_norm" in r}


def close(a: dict, b: dict, steps: list[int], tol: float = 1e-5) -> None:
    for step in steps:
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])


def resumed_copy(src: Path, dst: Path, drop_after: int) -> Path:
    """A copy of run `src` as if it had died right after step `drop_after`'s checkpoint."""
    shutil.copytree(src, dst)
    for step in checkpoint.complete_steps(dst / "checkpoints"):
        if step > drop_after:
            shutil.rmtree(checkpoint.step_dir(dst / "checkpoints", step))
    return dst


@pytest.mark.slow
@linux_only
def test_resume_across_mesh_shapes_and_tp2_parity(tmp_path):
    """(2, 1) -> (1, 2) -> (1, 1), each hop resharding model and optimizer; tp=2 against one process
    on the same weights and data; a same-mesh resume bit-exact."""
    every = ("checkpoint.every=2", "checkpoint.keep=5", "optim.accum_steps=2")
    dp2 = tmp_path / "dp2"
    train(dp2, 2, "steps=2", *every)  # mesh (2, 1): plain FSDP2

    # (2, 1) -> (1, 2): the data-parallel size changes, so the stream restarts resharded (as today)
    tp2 = resumed_copy(dp2, tmp_path / "tp2", 2)
    out = train(tp2, 2, "steps=6", "parallel.tp=2", *every)
    assert "mesh dp=1 x tp=2" in out.stdout and "resharded from world size 2 to 1 data-parallel ranks" in out.stdout
    # ... and one process resuming from the same checkpoint reads the same data: tp=2 parity, 4 steps
    one = resumed_copy(dp2, tmp_path / "one", 2)
    train(one, None, "steps=6", *every)
    close(losses(tp2), losses(one), [3, 4, 5, 6])
    close(grad_norms(tp2), grad_norms(one), [3, 4, 5, 6])
    assert losses(tp2)[6] < losses(tp2)[3]  # it trains

    # (1, 2) -> (1, 1): the same data-parallel size, so the stream continues where it stopped
    back = resumed_copy(tp2, tmp_path / "back", 4)
    out = train(back, None, "steps=6", *every)
    assert "resumed from" in out.stdout and "at step 4" in out.stdout and "resharded" not in out.stdout
    close(losses(back), losses(tp2), [5, 6])
    close(grad_norms(back), grad_norms(tp2), [5, 6])

    # the same mesh: bit-exact
    again = resumed_copy(tp2, tmp_path / "again", 4)
    train(again, 2, "steps=6", "parallel.tp=2", *every)
    assert losses(again) == losses(tp2) and grad_norms(again) == grad_norms(tp2)
    marker = checkpoint.info(checkpoint.step_dir(tp2 / "checkpoints", 6))
    assert marker["world_size"] == 2 and marker["tp"] == 2


@pytest.mark.slow
@linux_only
def test_dp2_tp2_sequence_parallel_matches_one_process(tmp_path):
    """4 processes, mesh (2, 2), sequence parallelism, selective activation checkpointing and compiled
    blocks, against one process with twice the accumulation: the same global batch."""
    steps = ("steps=4", "checkpoint.every=100")
    mesh = tmp_path / "mesh"
    out = train(
        mesh,
        4,
        *steps,
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
        "parallel.activation_checkpointing=selective",
        "parallel.compile=true",
    )
    assert "mesh dp=2 x tp=2" in out.stdout and "tokens per step: 128" in out.stdout
    one = tmp_path / "one"
    train(one, None, *steps, "optim.accum_steps=2")
    assert sorted(losses(mesh)) == [1, 2, 3, 4]
    close(losses(mesh), losses(one), [1, 2, 3, 4])
    close(grad_norms(mesh), grad_norms(one), [1, 2, 3, 4])
    record = [r for r in MetricsFile(mesh / "metrics.jsonl").read() if "loss" in r][-1]
    assert record["tokens_per_s_per_device"] == pytest.approx(record["tokens_per_s"] / 4)  # MFU per device: / world
    # the checkpoint it wrote loads into one unsharded model (generation, probing and evaluation read it so)
    model = models.build(TransformerConfig(**_model_fields(mesh)))
    checkpoint.load_model(checkpoint.step_dir(mesh / "checkpoints", 4), model)


def _model_fields(run_dir: Path) -> dict:
    import yaml

    fields = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    return {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(TransformerConfig)}}


# ---------------------------------------------------------------- fast checks (one process)


def test_refused_tp3_names_both_head_fields(tmp_path, capsys):
    code = main([str(DEBUG), *TINY, f"run_dir={tmp_path / 'r'}", "parallel.tp=3"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "n_heads=4" in err and "n_kv_heads=2" in err and "parallel.tp=3" in err
    assert not (tmp_path / "r").exists()


def test_an_unsplittable_sequence_is_refused(tmp_path, capsys):
    sp = ("parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=15")
    assert main([str(DEBUG), *TINY, f"run_dir={tmp_path / 'r'}", *sp]) == 2
    assert "data.seq_len: 15 must be divisible by parallel.tp=2" in capsys.readouterr().err


def test_tp_needs_torchrun_and_a_divisible_world(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="parallel.tp: tp=2 needs several processes"):
        init("cpu", tp=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="tp=2 does not divide the world size 3"):
        init("cpu", tp=2)


def test_an_arch_without_a_plan_is_refused_by_the_registry():
    @dataclasses.dataclass
    class NoPlanConfig:
        arch: str = "no_tp_plan"
        vocab_size: int | None = None

    registry.register(dataclasses.replace(SPEC, arch="no_tp_plan", config=NoPlanConfig, tensor_parallel=None))
    try:
        models.check_tensor_parallel(NoPlanConfig(), 1)  # tp=1 is always fine
        with pytest.raises(ConfigError, match="model.arch=no_tp_plan has no tensor-parallel plan"):
            models.check_tensor_parallel(NoPlanConfig(), 2)
    finally:
        registry.SPECS._entries.pop("no_tp_plan", None)  # leave the registry as the other tests expect it


def test_qkv_row_order_gives_each_rank_its_own_q_k_v_heads():
    cfg = TransformerConfig(vocab_size=8, dim=8, n_heads=4, n_kv_heads=2)  # head_dim 2
    order = qkv_row_order(cfg, 2)
    # canonical rows: q 0..7 (4 heads x 2), k 8..11, v 12..15; rank 0 takes q heads 0-1, k head 0, v head 0
    assert order.tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 4, 5, 6, 7, 10, 11, 14, 15]
    assert sorted(qkv_row_order(cfg, 1).tolist()) == qkv_row_order(cfg, 1).tolist() == list(range(16))


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(a, 0.5).item()
    assert abs(tensor_parallel.clip_grad_norm(b, 0.5) - expected) < 1e-6
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_launcher_tp_asks_for_whole_groups_per_node():
    from nanollama.launcher.scripts import sbatch_lines
    from nanollama.launcher.spec import parse

    launch = parse([str(DEBUG), "tp=8", "nodes=2", "torchrun=true"])
    assert launch.cfg.gpus_per_node == 8 and launch.run["parallel"]["tp"] == 8
    lines = sbatch_lines(launch.cfg, 1, Path("logs"))
    assert "--gpus-per-node=8" in lines and "--nodes=2" in lines
    with pytest.raises(ConfigError, match="gpus_per_node: 4 must be a multiple of tp=8"):
        parse([str(DEBUG), "tp=8", "gpus_per_node=4", "torchrun=true"])
    with pytest.raises(ConfigError, match="tp=2 needs torchrun"):
        parse([str(DEBUG), "tp=2", "launcher=bash"])
    with pytest.raises(ConfigError, match="the run sets parallel.tp=4"):
        parse([str(DEBUG), "tp=2", "torchrun=true", "parallel.tp=4"])


@pytest.mark.slow
@linux_only
def test_tp2_forward_and_head_sharded_decode_match_one_piece():
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    worker = str(Path(__file__).parent / "tp_worker.py")
    proc = subprocess.run([sys.executable, *launcher, worker], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "head-sharded decode match" in proc.stdout
