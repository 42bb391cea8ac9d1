"""The recurrent archs train through the real trainer (no arch named in it): the loss falls, the
activations can be probed; FSDP on 2 gloo ranks matches one rank (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import tiny

from nanollama.generate import cli as gen
from nanollama.generate import generate
from nanollama.probe.activations import activations, layer_names
from nanollama.runs import load_run
from nanollama.train.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "gssm"
ROOT = Path(__file__).resolve().parents[1]


def _train(arch: str, run_dir: Path, steps: int, extra: dict | None = None) -> list[dict]:
    changes = {"steps": steps, "optim.lr": 1e-2, "run_dir": run_dir, "device": "cpu", "log.every": 5}
    if arch == "hybrid":
        changes["model.n_layers"] = 2  # pattern RA: one recurrent block, one attention block
    code = main([str(CONFIGS / f"debug_{arch}.yaml"), *tiny({**changes, **(extra or {})})])
    assert code == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["mingru", "hawk", "mamba2", "hybrid"])
def test_loss_falls_on_a_tiny_cpu_config(arch, tmp_path):
    records = [r for r in _train(arch, tmp_path / arch, 30) if "loss" in r]
    assert records[0]["params"] > 0 and records[-1]["step"] == 30
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.3, (first, last)  # log 32 = 3.47 at the start


@pytest.mark.parametrize("arch", ["minlstm", "mamba2"])
def test_document_packing_trains_with_resets(arch, tmp_path):
    records = _train(arch, tmp_path / "doc", 30, {"data.mask": "document", "data.doc_min": 4})
    train = [r for r in records if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in train)  # no nan from the -inf log decays at resets
    assert train[-1]["loss"] < train[0]["loss"] - 0.3, (train[0]["loss"], train[-1]["loss"])


def test_probing_activations_of_recurrent_and_attention_blocks(tmp_path):
    run_dir = tmp_path / "hybrid"
    _train("hybrid", run_dir, 2)
    _, model = load_run(run_dir, device="cpu")
    names = layer_names(model, ("resid", "attn", "mlp"))
    assert names == ["embed", "layer.0.resid", "layer.0.mlp", "layer.1.resid", "layer.1.attn", "layer.1.mlp",
                     "final_norm"]  # fmt: skip
    tokens = torch.randint(0, model.vocab_size, (2, 9))
    acts = activations(model, tokens, sites=("resid", "attn", "mlp"))
    assert all(a.shape == (2, 9, model.config.dim) for a in acts.values())
    # the residual stream after block 0 is its input plus the mixer's and the MLP's contributions
    block = model.layers[0]
    x = acts["embed"]
    mixed = x + block.mixer(block.mixer_norm(x))
    torch.testing.assert_close(acts["layer.0.resid"], mixed + acts["layer.0.mlp"])


def test_the_probe_cli_scores_the_recurrent_state(tmp_path, capsys):
    from nanollama.probe.cli import main as probe

    run_dir = tmp_path / "mamba2"
    _train("mamba2", run_dir, 2)
    assert probe([str(run_dir), "--sites", "state", "--layers", "0", "--sequences", "16", "--no-controls"]) == 0
    assert "layer.0.state" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]
    assert {(r["layer"], r["node"]) for r in records} == {("layer.0.state", n) for n in ("clock", "fast", "joint")}
    assert all(0 < r["acc_frac"] <= 1.05 for r in records)


def test_activation_checkpointing_leaves_the_losses_unchanged(tmp_path):
    """full and selective recompute each recurrent block's forward in backward: same losses as none."""
    runs = {}
    for mode in ("none", "full", "selective"):
        records = _train("mamba2", tmp_path / mode, 3, {"log.every": 1, "parallel.activation_checkpointing": mode})
        runs[mode] = [r["loss"] for r in records if "loss" in r]
    assert len(runs["none"]) == 3
    for mode in ("full", "selective"):
        assert max(abs(a - b) for a, b in zip(runs["none"], runs[mode])) < 1e-6, runs


def test_the_generate_cli_runs_a_trained_recurrent_model(tmp_path, capsys):
    run_dir = tmp_path / "hawk"
    _train("hawk", run_dir, 2)
    capsys.readouterr()  # the trainer's log lines
    assert gen.main([str(run_dir), "--prompt", "3 1 4", "--prompt", "2", "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    _, model = load_run(run_dir, device="cpu")
    assert [list(map(int, line.split())) for line in lines] == generate(model, [[3, 1, 4], [2]], 5)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_fsdp_on_two_gloo_ranks_matches_one_rank(tmp_path):
    """Hawk under torchrun (2 ranks, FSDP2 on its blocks) against one process with twice the accumulation."""
    common = tiny({"steps": 4, "log.every": 1, "device": "cpu", "checkpoint.every": 4})
    one = tmp_path / "one"
    assert main([str(CONFIGS / "debug_hawk.yaml"), *common, f"run_dir={one}", "optim.accum_steps=2"]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           "-m", "nanollama.train", str(CONFIGS / "debug_hawk.yaml"), *common, f"run_dir={two}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
