"""Llama-format weights in and out: logits against transformers' LlamaForCausalLM both ways, Meta's
q/k permutation against a hand-written interleaved RoPE, `python -m nanollama.convert`, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import train_tiny_run

from nanollama.convert.cli import main as convert_main
from nanollama.models.transformer import ConvertError, Transformer, TransformerConfig, from_hf, save_hf, to_hf
from nanollama.models.transformer.meta import permute_meta
from nanollama.runs import load_run

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-5  # fp32; the outside check of the same architecture gave 1.5e-5
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0},
}


def hf_model(rope=None, tie=False, vocab=61, seed=0):
    """A randomly initialised tiny LlamaForCausalLM (GQA: 4 query heads, 2 kv heads), weights of std 0.2."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        rope_scaling=rope,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # larger than the default init, so every weight moves the logits
    return model


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("rope", list(ROPES))
def test_hf_checkpoint_in_and_back_out_gives_the_same_logits(rope, tmp_path):
    hf = hf_model(ROPES[rope])
    hf.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 61, (2, 48), generator=torch.Generator().manual_seed(1))  # past the original 16
    ref = logits(hf, tokens)
    ours = from_hf(tmp_path / "hf")
    assert ours.config.n_kv_heads == 2 and ours.config.hidden_dim == 48 and ours.config.max_seq_len == 64
    assert (ours.config.rope_scaling or {}).get("type") == (None if rope == "default" else rope)
    assert (logits(ours, tokens) - ref).abs().max().item() < TOL
    save_hf(ours, tmp_path / "back")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (logits(back, tokens) - ref).abs().max().item() < TOL
    assert ref.std().item() > 0.1  # logits that differ between tokens: the check could fail


def test_our_model_exported_and_reloaded_tied_and_ntk(tmp_path):
    """Ours -> transformers for what HF checkpoints rarely have: tied embeddings, our static NTK scaling."""
    cfg = TransformerConfig(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=40, hidden_dim=40,
        rope_scaling={"type": "ntk", "factor": 4.0}, tie_embeddings=True,
    )  # fmt: skip
    ours = Transformer(cfg).eval()
    ours.reset_parameters(seed=3)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(4.0)  # std 0.08: logits far from uniform
    sd = to_hf(ours)
    assert "lm_head.weight" not in sd and sd["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)
    save_hf(ours, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 50, (3, 40), generator=torch.Generator().manual_seed(2))
    ref = logits(ours, tokens)
    assert (logits(hf, tokens) - ref).abs().max().item() < TOL
    again = from_hf(hf.state_dict(), config=hf.config.to_dict())  # the state-dict form, tied
    assert again.output.weight is again.tok_embeddings.weight
    assert (logits(again, tokens) - ref).abs().max().item() < TOL


def test_meta_permutation_by_hand():
    """head_dim 4: rows (0, 1, 2, 3) of each head become (0, 2, 1, 3); heads stay in place."""
    w = torch.arange(8.0)[:, None].repeat(1, 3)  # 2 heads x head_dim 4, row r holds r
    assert permute_meta(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's reference RoPE: (B, S, H, D) with dims (2i, 2i+1) one complex number, times e^{i p f_i}."""
    _, S, _, D = x.shape
    freqs = theta ** -(torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.polar(torch.ones(S, D // 2, dtype=torch.float64), torch.arange(S)[:, None] * freqs)  # (S, D/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2))
    return torch.view_as_real(xc * angles[None, :, None]).flatten(-2).float()


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_gives_the_logits_of_meta_rope(shards, tmp_path):
    """A consolidated checkpoint built by hand (whole, or split as 2-way model parallelism splits it):
    our model of it matches attention computed the Meta way."""
    torch.manual_seed(4)
    dim, H, Hk, D, vocab = 32, 4, 2, 8, 40
    sd = {"tok_embeddings.weight": torch.randn(vocab, dim), "norm.weight": torch.rand(dim) + 0.5}
    sd["output.weight"] = torch.randn(vocab, dim) * 0.2
    sd["rope.freqs"] = torch.zeros(D // 2)  # old checkpoints carry it; ignored
    p = "layers.0."
    shapes = {"attention.wq": (H * D, dim), "attention.wk": (Hk * D, dim), "attention.wv": (Hk * D, dim)}
    shapes |= {"attention.wo": (dim, H * D), "feed_forward.w1": (48, dim), "feed_forward.w3": (48, dim)}
    shapes |= {"feed_forward.w2": (dim, 48)}
    for name, shape in shapes.items():
        sd[p + name + ".weight"] = torch.randn(shape) * 0.3
    sd[p + "attention_norm.weight"] = torch.rand(dim) + 0.5
    sd[p + "ffn_norm.weight"] = torch.rand(dim) + 0.5
    (tmp_path / "params.json").write_text(
        json.dumps({"dim": dim, "n_layers": 1, "n_heads": H, "n_kv_heads": Hk, "vocab_size": vocab, "multiple_of": 16,
                    "norm_eps": 1e-5, "rope_theta": 100.0})
    )  # fmt: skip
    split_dim = {"tok_embeddings": 1, "wo": 1, "w2": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0}
    for r in range(shards):
        part = {}
        for name, t in sd.items():
            dim = split_dim.get(name.split(".")[-2])
            part[name] = t if dim is None else t.chunk(shards, dim=dim)[r].clone()
        torch.save(part, tmp_path / f"consolidated.{r:02d}.pth")
    ours = from_hf(tmp_path, max_seq_len=24)
    assert ours.config.hidden_dim == 48 and not ours.config.tie_embeddings

    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    # Meta's forward, written out: interleaved RoPE on unpermuted q and k
    h = sd["tok_embeddings.weight"][tokens]
    x = rms(h, sd[p + "attention_norm.weight"])
    B, S, _ = x.shape
    q = meta_rope((x @ sd[p + "attention.wq.weight"].T).view(B, S, H, D), 100.0)
    k = meta_rope((x @ sd[p + "attention.wk.weight"].T).view(B, S, Hk, D), 100.0)
    v = (x @ sd[p + "attention.wv.weight"].T).view(B, S, Hk, D)
    k, v = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
    att = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    h = h + att.transpose(1, 2).reshape(B, S, H * D) @ sd[p + "attention.wo.weight"].T
    y = rms(h, sd[p + "ffn_norm.weight"])
    silu = torch.nn.functional.silu(y @ sd[p + "feed_forward.w1.weight"].T)
    h = h + (silu * (y @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    ref = rms(h, sd["norm.weight"]) @ sd["output.weight"].T
    assert (logits(ours, tokens) - ref).abs().max().item() < 1e-4
    # without the permutation the logits differ: the test sees it
    ours.layers[0].attention.wqkv.weight.data[: H * D] = sd[p + "attention.wq.weight"]
    assert (logits(ours, tokens) - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "change, match",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
        ({"vocab_size": 60}, "vocab mismatch: the config says vocab_size=60, the embedding has 61 rows"),
        ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ],
)
def test_unsupported_hf_configs_are_one_line(change, match, tmp_path):
    hf_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ConvertError, match=match) as e:
        from_hf(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(ConvertError, match="not a directory"):
        from_hf(tmp_path / "nope")
    with pytest.raises(ConvertError, match="config.json: not found"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConvertError, match="not valid JSON"):
        from_hf(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("convert") / "run")


def test_cli_exports_a_run_that_transformers_loads(run_dir, tmp_path, capsys):
    assert convert_main([str(run_dir), "--to-hf", str(tmp_path / "hf"), "--checkpoint", "5"]) == 0
    _, ours = load_run(run_dir, "cpu")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, ours.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    assert (logits(hf, tokens) - logits(ours, tokens)).abs().max().item() < TOL
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    capsys.readouterr()
    assert convert_main([str(run_dir), "--to-hf", str(tmp_path / "hf")]) == 2  # would replace a model
    assert "already holds a model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["{missing}", "--to-hf", "{out}"], "run directory not found"),
        (["{run}", "--to-hf", "{out}", "--checkpoint", "7"], "--checkpoint 7: no complete checkpoint"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, match, run_dir, tmp_path, capsys):
    paths = {"missing": tmp_path / "nope", "out": tmp_path / "out", "run": run_dir}
    assert convert_main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_cli_as_a_module(run_dir, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "nanollama.convert", str(run_dir), "--to-hf", str(tmp_path / "hf")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
