"""A new model and a new data source train through the real trainer with no edit to it (toy_plugins.py)."""

import json

import numpy as np
import pytest
import toy_plugins
import yaml

from nanollama import config
from nanollama.config import ConfigError
from nanollama.train.cli import main
from nanollama.train.config import TrainConfig


@pytest.fixture()
def toy_run(tmp_path):
    toy_plugins.register()
    rng = np.random.default_rng(0)
    # A deterministic cycle 0 -> 1 -> ... -> 6 -> 0 with 10% noise: a bigram model can learn it.
    tokens = np.arange(6000) % 7
    noise = rng.random(6000) < 0.1
    tokens[noise] = rng.integers(0, 7, noise.sum())
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "steps": 40,
        "model": {"arch": "bigram", "dim": 8},
        "data": {"source": "tokenfile", "path": str(tmp_path / "tokens.npy"), "batch_size": 8, "seq_len": 16},
        "optim": {"lr": 0.05, "warmup": 2},
        "log": {"every": 10},
        "eval": {"every": 20, "batches": 2},
        "checkpoint": {"every": 20},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / "run"


def test_toy_model_and_source_train_resume_and_report_no_oracle(toy_run):
    path, run_dir = toy_run
    assert main([str(path), "steps=20", "device=cpu"]) == 0
    assert main([str(path), "device=cpu"]) == 0  # resumes at step 20 and trains to 40
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert all("bayes_loss" not in r and "excess_loss" not in r for r in evals)  # no oracle: simply absent
    # The cycle's entropy is about 0.45 nats (10% noise over 7 tokens), against log 7 = 1.95 at the start.
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < train[0]["loss"] - 0.2 and evals[-1]["eval_loss"] < 1.2
    assert train[-1]["mfu"] is None  # no GPU, no peak: never a guess
    saved = config.load(TrainConfig, run_dir / "config.yaml")
    assert saved.model.arch == "bigram" and saved.model.vocab_size == 7 and saved.data.source == "tokenfile"
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_a_source_owns_its_config_section(toy_run):
    path, _ = toy_run
    with pytest.raises(ConfigError, match=r"data\.graph_seed: unknown key"):
        config.load(TrainConfig, path, ["data.graph_seed=3"])  # a GSSM key, not the token file's
    with pytest.raises(ConfigError, match=r"model\.n_heads: unknown key"):
        config.load(TrainConfig, path, ["model.n_heads=3"])
    with pytest.raises(ConfigError, match=r"model\.arch: unknown architecture 'bigrm' \(did you mean 'bigram'\?\)"):
        config.load(TrainConfig, path, ["model.arch=bigrm"])


def test_an_override_alone_switches_a_variant_section():
    """`model.arch=...` / `data.source=...` on the command line, with no such section in the YAML."""
    toy_plugins.register()
    cfg = config.load(TrainConfig, None, ["model.arch=bigram", "model.dim=4", "data.source=tokenfile", "data.path=t"])
    assert type(cfg.model).__name__ == "BigramConfig" and cfg.model.dim == 4
    assert type(cfg.data).__name__ == "TokenFileConfig" and cfg.data.path == "t"
