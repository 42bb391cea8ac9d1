"""Data-size runs: data.train_sequences=D repeats D fixed sequences (onfly and files), counts epochs,
resumes bit-exactly, and the metrics carry epoch and the parameter counts."""

import shutil
from pathlib import Path

import pytest
import torch
from tiny_run import tiny

from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig
from nanollama.data.gssm.__main__ import main as write_files
from nanollama.data.gssm.reader import TokenFileDataset
from nanollama.data.gssm.stream import build_train_stream
from nanollama.observe.metrics import MetricsFile
from nanollama.train import checkpoint
from nanollama.train.cli import main

DEBUG = Path(__file__).parents[1] / "configs" / "gssm" / "debug.yaml"
TINY = tiny({"eval.every": 5})


@pytest.fixture(scope="module")
def gssm():
    cfg = GSSMConfig(
        nodes=[
            NodeConfig("a", state_dim=5, alpha=1.0),
            NodeConfig("x", state_dim=11, alpha=1.0, parents=["a"], observed=True),
        ]
    )
    return GSSM(cfg, seed=3)


def take(stream, k):
    return [next(stream) for _ in range(k)]


def onfly(gssm, d, rank=0, world=1, workers=0, batch=8):
    return build_train_stream(
        "onfly", gssm=gssm, batch_size=batch, seq_len=12, seed=5, rank=rank, world_size=world,
        num_workers=workers, train_sequences=d,
    )  # fmt: skip


def test_onfly_budget_repeats_d_sequences_and_counts_epochs(gssm):
    s = onfly(gssm, 24)
    first = torch.cat(take(s, 3))  # 3 batches of 8: one epoch
    assert s.epochs_seen() == 1.0 and len({tuple(r.tolist()) for r in first}) == 24
    assert torch.equal(torch.cat(take(s, 3)), first)  # the second epoch is the same sequences, in order
    # D not a multiple of the batch: global sequence index mod D
    t = onfly(gssm, 20)
    rows = torch.cat(take(t, 5))  # 40 rows: the pool twice
    assert torch.equal(rows[:20], rows[20:]) and torch.equal(rows[:20], first[:20])  # nested pools
    assert t.epochs_seen() == 2.0
    assert onfly(gssm, None).epochs_seen() is None and not torch.equal(next(onfly(gssm, None)), first[:8])


def test_onfly_budget_keeps_the_rank_interleaving_workers_and_resume(gssm):
    single = torch.cat(take(onfly(gssm, 24, batch=4), 6))
    r0, r1 = take(onfly(gssm, 24, 0, 2, batch=4), 3), take(onfly(gssm, 24, 1, 2, batch=4), 3)
    assert torch.equal(torch.cat([x for pair in zip(r0, r1) for x in pair]), single)  # global batch 2k + r
    assert torch.equal(torch.cat(take(onfly(gssm, 24, workers=2, batch=4), 6)), single)
    s = onfly(gssm, 24, batch=4)
    take(s, 4)
    state = s.state_dict()
    assert state["train_sequences"] == 24
    resumed = onfly(gssm, 24, batch=4)
    resumed.load_state_dict(state)
    assert torch.equal(torch.cat(take(resumed, 2)), single[16:]) and resumed.epochs_seen() == 1.0
    with pytest.raises(ValueError, match="train_sequences"):
        onfly(gssm, 30, batch=4).load_state_dict(state)
    with pytest.raises(ValueError, match="missing 'train_sequences'"):  # a budget cannot be added on resume
        onfly(gssm, 24, batch=4).load_state_dict(onfly(gssm, None, batch=4).state_dict() | {"index": 1})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("files") / "data"
    assert write_files([str(DEBUG), *TINY, "--out", str(out), "--train", "100", "--test", "16"]) == 0
    return out


def test_files_budget_uses_the_first_d_sequences(data_dir):
    split = TokenFileDataset(data_dir, "train", length=17)
    allowed = {tuple(split[i].tolist()) for i in range(24)}
    s = build_train_stream("files", path=data_dir, batch_size=8, seq_len=16, seed=1, train_sequences=24)
    epoch = torch.cat(take(s, 3))
    assert {tuple(r.tolist()) for r in epoch} == allowed and s.epochs_seen() == 1.0
    second = torch.cat(take(s, 3))
    assert {tuple(r.tolist()) for r in second} == allowed and not torch.equal(second, epoch)  # reshuffled
    with pytest.raises(ValueError, match="train_sequences=500"):
        build_train_stream("files", path=data_dir, batch_size=8, seq_len=16, seed=1, train_sequences=500)


def run(tmp_path, *extra, name="run"):
    run_dir = tmp_path / name
    code = main([str(DEBUG), *TINY, f"run_dir={run_dir}", *extra])
    return code, MetricsFile(run_dir / "metrics.jsonl").read()


def losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("source", ["onfly", "files"])
def test_budget_runs_log_epochs_and_resume_bitwise(tmp_path, source, data_dir):
    extra = [f"data.source={source}", f"data.path={data_dir}"] if source == "files" else []
    args = ("steps=12", "checkpoint.every=4", "checkpoint.keep=5", "data.train_sequences=24", *extra)
    code, full = run(tmp_path, *args, name="full")
    assert code == 0
    train = [r for r in full if "loss" in r]
    assert [r["epoch"] for r in train] == pytest.approx([s / 3 for s in range(1, 13)])  # 8 rows a step, D = 24
    assert train[0]["params"] > train[0]["params_no_embed"] > 0 and "params" not in train[1]
    shutil.copytree(tmp_path / "full", tmp_path / "partial")
    for step in (12, 8):
        shutil.rmtree(checkpoint.step_dir(tmp_path / "partial" / "checkpoints", step))
    code, resumed = run(tmp_path, *args, name="partial")
    assert code == 0 and losses(resumed) == losses(full)
    assert [r["epoch"] for r in resumed if "loss" in r] == [r["epoch"] for r in train]


def test_a_bad_budget_is_a_one_line_error(tmp_path, capsys):
    assert run(tmp_path, "data.train_sequences=0")[0] == 2
    assert "data.train_sequences" in capsys.readouterr().err
