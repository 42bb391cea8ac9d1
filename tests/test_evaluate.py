"""`python -m nanollama.evaluate`: pending, named and latest checkpoints, on held-out batches or a test split."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_run import CONFIG, tiny

from nanollama import models
from nanollama.data.gssm.__main__ import main as write_files
from nanollama.evaluate.checkpoints import main
from nanollama.observe.metrics import MetricsFile
from nanollama.runs import load_config
from nanollama.train import checkpoint
from nanollama.train.cli import main as train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    run_dir, data_dir = root / "run", root / "data"
    args = tiny({"steps": 4, "checkpoint.every": 2, "checkpoint.keep": 5, "optim.lr": 1e-2})
    assert train([str(CONFIG), *args, f"run_dir={run_dir}", "device=cpu"]) == 0
    assert write_files([str(CONFIG), *tiny(), "--out", str(data_dir), "--train", "16", "--test", "24"]) == 0
    return run_dir, data_dir


def evaluations(run_dir):
    return MetricsFile(run_dir / "evaluations.jsonl").read()


def test_latest_and_named_checkpoints_are_evaluated(trained, capsys):
    run_dir, _ = trained
    before = len(evaluations(run_dir))
    assert main([str(run_dir), "--latest"]) == 0
    assert main([str(run_dir), "--checkpoint", "2"]) == 0
    assert main([str(run_dir), "--checkpoint", str(checkpoint.step_dir(run_dir / "checkpoints", 4))]) == 0
    out = capsys.readouterr().out
    assert "step 4 | eval_loss" in out and "step 2 | eval_loss" in out
    latest, second, by_path = evaluations(run_dir)[before:]
    assert (latest["step"], second["step"], by_path["step"]) == (4, 2, 4)
    assert latest["eval_loss"] == by_path["eval_loss"] != second["eval_loss"]
    assert latest["bayes_loss"] == second["bayes_loss"]  # the same held-out batches
    assert latest["excess_loss"] == pytest.approx(latest["eval_loss"] - latest["bayes_loss"])


def test_a_missing_checkpoint_is_a_one_line_error(trained, capsys):
    run_dir, _ = trained
    assert main([str(run_dir), "--checkpoint", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint 3: ") and "(complete steps: 2, 4)" in err and err.count("\n") == 1


def test_nothing_pending_says_how_to_evaluate_one(trained, capsys):
    run_dir, _ = trained
    assert main([str(run_dir)]) == 0
    assert "no checkpoint is pending evaluation (--latest or --checkpoint STEP" in capsys.readouterr().out


def test_a_data_directorys_test_split_against_its_bayes_loss(trained, capsys):
    run_dir, data_dir = trained
    assert main([str(run_dir), "--latest", "--data", str(data_dir), "--batch-size", "5"]) == 0
    record = evaluations(run_dir)[-1]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert record["split"] == "test" and record["data"] == str(data_dir)
    assert record["bayes_loss"] == manifest["test_bayes_nll"]
    # the same number computed directly: mean cross-entropy over every target of every test row
    cfg = load_config(run_dir)
    model = models.build(cfg.model).eval()
    checkpoint.load_model(checkpoint.latest(run_dir / "checkpoints"), model)
    import numpy as np

    rows = torch.from_numpy(np.load(data_dir / "test_tokens.npy").astype(np.int64))
    with torch.no_grad():
        logits = model(rows[:, :-1])
        want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1)).item()
    assert record["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert record["excess_loss"] == pytest.approx(want - manifest["test_bayes_nll"], rel=1e-4, abs=1e-6)
    assert f"step 4 | {data_dir} test split | eval_loss" in capsys.readouterr().out


def test_data_from_another_graph_is_refused(trained, tmp_path, capsys):
    run_dir, _ = trained
    other = tmp_path / "other"
    assert (
        write_files([str(CONFIG), *tiny(), "data.graph_seed=9", "--out", str(other), "--train", "8", "--test", "8"])
        == 0
    )
    assert main([str(run_dir), "--latest", "--data", str(other)]) == 2
    assert "written from another GSSM" in capsys.readouterr().err


def test_an_empty_config_yaml_is_not_read_as_the_defaults(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("")
    assert main([str(tmp_path), "--latest"]) == 2
    assert "config.yaml is empty; relaunching the training command restores it" in capsys.readouterr().err
