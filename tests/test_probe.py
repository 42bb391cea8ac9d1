"""Probing: activations by hooks, probes on synthetic activations whose answer is known, the held-out
split, and the CLI on a tiny trained run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import toy_plugins

from nanollama import models
from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig
from nanollama.models.transformer.model import TransformerConfig
from nanollama.probe import activations, ceilings, collect, probe_targets, resolve_layers, score_layer
from nanollama.probe.cli import main
from nanollama.probe.fit import Features, fit_ridge
from nanollama.probe.scores import r_squared
from nanollama.probe.targets import Targets

# ----------------------------------------------------------------------------- activations


def tiny_transformer() -> torch.nn.Module:
    return models.build(TransformerConfig(vocab_size=11, dim=16, n_layers=2, n_heads=2, max_seq_len=16))


def test_activations_are_the_stream_the_model_computes():
    model = tiny_transformer().eval()
    tokens = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
    acts = activations(model, tokens, sites=("resid", "attn", "mlp"))
    assert list(acts) == [
        "embed",
        "layer.0.resid",
        "layer.0.attn",
        "layer.0.mlp",
        "layer.1.resid",
        "layer.1.attn",
        "layer.1.mlp",
        "final_norm",
    ]
    assert all(a.shape == (3, 9, 16) for a in acts.values())
    torch.testing.assert_close(acts["embed"], model.tok_embeddings(tokens))
    # attn and mlp are the residual contributions: the block's output is its input plus both
    for i, before in ((0, "embed"), (1, "layer.0.resid")):
        total = acts[before] + acts[f"layer.{i}.attn"] + acts[f"layer.{i}.mlp"]
        torch.testing.assert_close(acts[f"layer.{i}.resid"], total)
    torch.testing.assert_close(acts["final_norm"], model.norm(acts["layer.1.resid"]))
    torch.testing.assert_close(model.output(acts["final_norm"]), logits)
    # no hook is left behind, and the forward is unchanged
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():  # (with grad the attention backend may differ: no bitwise comparison there)
        assert torch.equal(model(tokens), logits)


def test_layers_by_index_and_name_and_bad_layers():
    model = tiny_transformer()
    assert resolve_layers(model, [-1, "embed"], ("resid",)) == ["layer.1.resid", "embed"]
    assert resolve_layers(model, ["1"], ("resid", "mlp")) == ["layer.1.resid", "layer.1.mlp"]
    with pytest.raises(ValueError, match="layer 2 does not exist: the model has 2 blocks"):
        resolve_layers(model, [2], ("resid",))
    with pytest.raises(ValueError, match="'layer.5.resid' does not exist"):
        resolve_layers(model, ["layer.5.resid"], ("resid",))
    with pytest.raises(ValueError, match="unknown site 'ffn'"):
        resolve_layers(model, None, ("ffn",))


def test_activations_of_another_architecture_and_in_bf16():
    toy_plugins.register()  # the bigram architecture (its blocks are [embed, out])
    bigram = models.build(toy_plugins.BigramConfig(vocab_size=7, dim=5))
    tokens = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(1))
    acts = activations(bigram, tokens)  # its blocks are [embed, out]: no stream before the first
    assert list(acts) == ["layer.0.resid", "layer.1.resid"]
    torch.testing.assert_close(acts["layer.0.resid"], bigram.embed(tokens))
    with pytest.raises(ValueError, match="'embed' does not exist"):
        activations(bigram, tokens, layers=["embed"])
    model = tiny_transformer().to(torch.bfloat16)
    tokens = torch.randint(0, 11, (5, 8), generator=torch.Generator().manual_seed(2))
    assert activations(model, tokens)["layer.1.resid"].dtype == torch.bfloat16
    got = collect(model, tokens, layers=[1], batch_size=2)  # batched, float32 for the probes
    assert got["layer.1.resid"].dtype == torch.float32 and got["layer.1.resid"].shape == (5, 8, 16)
    torch.testing.assert_close(got["layer.1.resid"], activations(model, tokens, layers=[1])["layer.1.resid"].float())


# ----------------------------------------------------------------------------- probes with a known answer

GRAPH = GSSMConfig(
    nodes=[
        NodeConfig("slow", 3, 0.2, mode="slow"),
        NodeConfig("fast", 4, 0.3, parents=["slow"]),
        NodeConfig("tokens", 6, 0.3, parents=["slow", "fast"], observed=True),
    ]
)


@pytest.fixture(scope="module")
def targets() -> Targets:
    return probe_targets(GSSM(GRAPH, seed=0), n_sequences=160, seq_len=24, seed=3)


def scores_for(x: torch.Tensor, targets: Targets, controls: bool = False) -> dict:
    return score_layer(x, targets, ceilings(targets), vocab_size=6, controls=controls)


def test_a_noisy_linear_image_of_the_state_is_decoded(targets):
    g = torch.Generator().manual_seed(0)
    z = targets.labels["fast"]
    x = F.one_hot(z, 4).float() @ torch.randn(4, 32, generator=g) + 0.1 * torch.randn(*z.shape, 32, generator=g)
    rec = scores_for(x, targets, controls=True)["fast"]
    assert rec["acc"] > 0.99 and rec["ce"] < 0.05
    assert rec["acc"] > rec["ceiling_acc"]  # the state itself is more than x_<=t tells
    assert rec["selectivity"] > 0.05  # x names the state, not the token: the control task is harder
    assert rec["l2"]["class"] in (1e-4, 1e-3, 1e-2, 1e-1)


def test_pure_noise_gives_chance(targets):
    x = torch.randn(*targets.tokens.shape, 16, generator=torch.Generator().manual_seed(1))
    for name, rec in scores_for(x, targets).items():
        assert abs(rec["acc"] - rec["chance_acc"]) < 0.04, name
        assert rec["belief_r2"] < 0.02, name


def test_the_exact_posterior_as_activations_reaches_the_ceiling(targets):
    """log p(z_t | x_<=t) as features: the softmax probe's population optimum is the posterior itself, so
    it reaches the ceiling up to the estimation error of its K x K weights (about K^2 / 2N nats of CE)."""
    assert set(targets.names) == {"slow", "fast", "joint"}
    assert targets.beliefs["joint"].shape == (160, 24, 12)
    for name in targets.names:
        q = targets.beliefs[name]
        rec = scores_for(q.clamp_min(1e-12).log(), targets)[name]
        assert abs(rec["acc"] - rec["ceiling_acc"]) < 0.01, (name, rec["acc"], rec["ceiling_acc"])
        n_fit = targets.n_fit * q.shape[1]
        assert abs(rec["ce"] - rec["ceiling_ce"]) < 0.01 + q.shape[-1] ** 2 / n_fit, name
        assert rec["belief_kl"] < 0.01 + q.shape[-1] ** 2 / n_fit, name
    # the belief itself as features: a linear map recovers it exactly
    q_fit, q_val, q_test = targets.split(targets.beliefs["fast"])
    ridge = fit_ridge(Features(q_fit, q_val), q_fit, q_val)
    assert r_squared(ridge(q_test), q_test) > 0.9999 and ridge.l2 <= 1e-4


def test_the_held_out_split_is_by_sequence(targets):
    """Labels constant within a sequence, features naming the sequence: a split by position would let the
    probe look the label up (accuracy ~1); by sequence it can only guess."""
    B, S = targets.tokens.shape
    seq = torch.arange(B)[:, None].expand(B, S)
    fit, val, test = targets.split(seq)
    assert fit.max() < val.min() and val.max() < test.min() and len(test) == (B - targets.n_train) * S
    labels = torch.randint(0, 3, (B, 1), generator=torch.Generator().manual_seed(4)).expand(B, S)
    leaky = Targets(
        targets.tokens, {"c": labels}, {"c": F.one_hot(labels, 3).double().float()}, targets.n_fit, targets.n_train, 0
    )
    x = F.one_hot(seq, B).float()
    rec = score_layer(x, leaky, ceilings(leaky), vocab_size=6, controls=False)["c"]
    assert rec["ceiling_acc"] == 1.0 and rec["acc"] < 0.6


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tiny_run import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("probe") / "run")


def test_cli_writes_one_record_per_layer_and_node(run_dir, capsys):
    assert main([str(run_dir), "--sequences", "16"]) == 0
    table = capsys.readouterr().out
    assert "clock" in table and "layer.0.resid" in table and "ceil" in table
    records = [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]
    assert {(r["layer"], r["node"]) for r in records} == {
        (layer, node) for layer in ("embed", "layer.0.resid", "final_norm") for node in ("clock", "fast", "joint")
    }
    for r in records:
        assert r["step"] == 5 and r["sequences"] == 16 and 0 <= r["acc"] <= 1 and 0 < r["ceiling_acc"] <= 1
        assert r["acc_frac"] == pytest.approx(r["acc"] / r["ceiling_acc"])
        assert {"random_init_acc", "control_acc", "selectivity", "chance_acc", "belief_kl", "by_position"} <= set(r)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "3"], "layer 3 does not exist"),
        (["--sequences", "4"], "too few"),
        (["--checkpoint", "7"], "--checkpoint '7'"),
        (["--sites", "ffn"], "unknown site"),
        (["--sites", "state"], "site 'state' does not exist in model.arch=transformer"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(run_dir, capsys, args, message):
    assert main([str(run_dir), *args, "--out", str(run_dir / "bad.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (run_dir / "bad.jsonl").exists()


def test_cli_refuses_data_without_a_hidden_state(run_dir, tmp_path, capsys, monkeypatch):
    assert main([str(tmp_path / "nowhere")]) == 2
    from nanollama.probe import probing

    class NoOracle:  # a data source without a GSSM behind it
        pass

    monkeypatch.setattr(probing.data, "build", lambda cfg: NoOracle())
    assert main([str(run_dir)]) == 2
    assert "not GSSM data" in capsys.readouterr().err

    class Visible:
        gssm = GSSM(GSSMConfig(nodes=[NodeConfig("tokens", 32, 1.0, observed=True)]), seed=0)

    monkeypatch.setattr(probing.data, "build", lambda cfg: Visible())
    assert main([str(run_dir)]) == 2
    assert "no hidden node" in capsys.readouterr().err


def test_the_over_training_summary_has_a_row_per_step_and_a_column_per_layer():
    from nanollama.probe.probing import format_over_steps

    records = [
        {"step": s, "layer": k, "node": n, "acc_frac": s / 100 + i / 10}
        for s in (10, 20)
        for i, k in enumerate(("embed", "layer.0.resid"))
        for n in ("clock", "fast")
    ]
    lines = format_over_steps(records).splitlines()
    assert lines[0] == "acc_frac of clock by step and layer" and "layer.0.resid" in lines[1]
    assert lines[3].split() == ["20", "0.200", "0.300"] and len(lines) == 8


@pytest.mark.slow
def test_probe_every_probes_each_nth_checkpoint_during_training(tmp_path):
    """probe.every=N runs the probe on the checkpoints of steps N, 2N, ... (a subprocess each)."""
    from tiny_run import CONFIG, tiny

    from nanollama.train.cli import main as train

    run_dir = tmp_path / "run"
    args = tiny({"steps": 4, "checkpoint.every": 2, "probe.every": 2, "probe.sequences": 16, "probe.controls": False})
    assert train([str(CONFIG), *args, f"run_dir={run_dir}", "device=cpu"]) == 0
    records = [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [2, 4]
    assert {r["node"] for r in records} >= {"clock", "fast"}


def test_probe_every_must_be_a_multiple_of_checkpoint_every():
    from tiny_run import CONFIG

    from nanollama import config
    from nanollama.train.config import TrainConfig

    with pytest.raises(config.ConfigError, match=r"probe\.every: must be a multiple of checkpoint\.every=4"):
        config.load(TrainConfig, CONFIG, ["checkpoint.every=4", "probe.every=6"])
