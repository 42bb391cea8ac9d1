"""Llama-format weights in and out: Hugging Face checkpoints (config.json + *.safetensors) and Meta's.

Our Transformer is a Hugging Face Llama with q, k and v fused into one projection (rows q, then k,
then v) and other names: the weights map one to one, with no permutation, because both rotate
the two halves of each head (rotate_half). Meta's consolidated.*.pth rotates interleaved pairs
instead, so its q and k rows are permuted on the way in (see meta.py).

RoPE scaling, both ways: linear, yarn and llama3 map key for key; our static `ntk` is a change of
base only, so it leaves as plain RoPE with the equivalent rope_theta; Hugging Face's `dynamic`
(which depends on the running sequence length) and other types have no counterpart here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from nanollama.models.transformer.checkpoint_io import ConvertError, read_json
from nanollama.models.transformer.meta import load_meta_dir
from nanollama.models.transformer.model import Transformer, TransformerConfig

__all__ = ["ConvertError", "config_from_hf", "from_hf", "hf_config", "load_hf_dir", "save_hf", "to_hf"]


# Hugging Face config keys whose values we cannot represent: (key, the only value allowed).
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "partial_rotary_factor": 1.0}


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling) from a transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters) config."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind == "default":
        return theta, None
    ctx = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    if kind == "linear":
        return theta, {"type": "linear", "factor": params.get("factor")}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        return theta, {"type": "llama3", "original_max_seq_len": ctx, **{k: params.get(k) for k in keys}}
    if kind == "yarn":
        if params.get("truncate", True) is not True:
            raise ConvertError("config.json: rope_scaling.truncate=false (yarn without truncation) is not supported")
        factor = params.get("factor") or hf["max_position_embeddings"] / ctx
        attention = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attention is None and mscale and mscale_all and factor > 1:  # DeepSeek's form of the temperature
            attention = (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
        out = {"type": "yarn", "factor": factor, "original_max_seq_len": ctx, "attention_factor": attention}
        out.update({k: params[k] for k in ("beta_fast", "beta_slow") if params.get(k)})
        return theta, out
    raise ConvertError(
        f"config.json: rope type {kind!r} is not supported (allowed: default, linear, yarn, llama3); "
        "'dynamic' scales with the running sequence length, which our model does not"
    )


def config_from_hf(hf: dict) -> TransformerConfig:
    """Our TransformerConfig for a Hugging Face LlamaConfig (as the dict of its config.json)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConvertError(f"config.json: model_type {hf.get('model_type')!r} is not supported (allowed: llama)")
    for key, allowed in _FIXED.items():
        if key in hf and hf[key] != allowed:
            raise ConvertError(f"config.json: {key}={hf[key]!r} is not supported (allowed: {allowed!r})")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hf.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
            raise ConvertError(
                f"config.json: head_dim={hf.get('head_dim')} is not hidden_size / num_attention_heads "
                f"({dim} / {n_heads}); our model has no separate head_dim"
            )
        theta, scaling = _rope_from_hf(hf)
        return TransformerConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            hidden_dim=int(hf["intermediate_size"]),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConvertError(f"config.json: missing key {e.args[0]!r}") from None
    except ValueError as e:  # our config's own checks (a ConfigError names the field)
        if isinstance(e, ConvertError):
            raise
        raise ConvertError(f"config.json: {e}") from None


def hf_config(cfg: TransformerConfig, torch_dtype: str = "float32") -> dict:
    """The config.json of a Hugging Face LlamaForCausalLM with our model's shape.

    RoPE is written as rope_theta + rope_scaling, which transformers 4 reads and 5 converts.
    """
    theta, scaling = cfg.rope_theta, None
    s = cfg.rope_scaling
    if s is not None and s["type"] == "ntk":  # static NTK is plain RoPE with another base
        theta = cfg.rope_theta * s["factor"] ** (cfg.head_dim / (cfg.head_dim - 2))
    elif s is not None and s["type"] == "linear":
        scaling = {"rope_type": "linear", "factor": s["factor"]}
    elif s is not None:
        scaling = {"rope_type": s["type"], "factor": s["factor"]}
        scaling["original_max_position_embeddings"] = s["original_max_seq_len"]
        keys = (
            ("beta_fast", "beta_slow", "attention_factor")
            if s["type"] == "yarn"
            else ("low_freq_factor", "high_freq_factor")
        )
        scaling.update({k: s[k] for k in keys if s[k] is not None})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": torch_dtype,
    }


# Per-layer names: ours -> Hugging Face's (the fused wqkv is handled on its own).
_LAYER = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Our model's weights under Hugging Face Llama names (q/k/v split, no permutation), on the CPU.

    With tied embeddings lm_head.weight is left out, as transformers saves it.
    """
    cfg = model.config
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {hf: sd[ours] for ours, hf in _TOP.items()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[ours + "attention.wqkv.weight"].split([q, kv, kv], dim=0)
        out[hf + "self_attn.q_proj.weight"] = wq
        out[hf + "self_attn.k_proj.weight"] = wk
        out[hf + "self_attn.v_proj.weight"] = wv
        for k, v in _LAYER.items():
            out[hf + v] = sd[ours + k]
    return {k: v.contiguous() for k, v in out.items()}  # safetensors wants contiguous, unshared tensors


def _ours_from_hf(sd: dict[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    used, out = set(), {}

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise ConvertError(f"weights: missing {name}")
        used.add(name)
        return sd[name]

    for ours, hf in _TOP.items():
        out[ours] = take(hf)
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # a saved copy of the tied table is redundant
    else:
        out["output.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        parts = [take(hf + f"self_attn.{p}_proj.weight") for p in "qkv"]
        out[ours + "attention.wqkv.weight"] = torch.cat(parts, dim=0)
        for k, v in _LAYER.items():
            out[ours + k] = take(hf + v)
    extra = sorted(k for k in set(sd) - used if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConvertError(f"weights: unexpected {extra[0]} ({len(extra)} unexpected in all; is it a Llama?)")
    return out


def load_into(cfg: TransformerConfig, ours: dict[str, torch.Tensor]) -> Transformer:
    """A model of `cfg` holding `ours` (our names); shape mismatches (e.g. the vocabulary) in one line."""
    emb = ours["tok_embeddings.weight"]
    if emb.shape[0] != cfg.vocab_size:
        raise ConvertError(
            f"vocab mismatch: the config says vocab_size={cfg.vocab_size}, the embedding has {emb.shape[0]} rows"
        )
    with torch.device("meta"):
        model = Transformer(cfg)
    want = model.state_dict()
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(want[name].shape):
            raise ConvertError(
                f"weights: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(want[name].shape)}"
            )
    model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=not cfg.tie_embeddings)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty broke the tie
    model.reset_buffers()
    return model.eval()


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ConvertError(
            "reading or writing .safetensors needs safetensors: pip install 'nanollama[convert]'"
        ) from None
    return safetensors.torch


def load_hf_dir(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, the state dict) of a Hugging Face model directory."""
    if not path.is_dir():
        raise ConvertError(f"{path}: not a directory")
    hf = read_json(path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    if files:
        st = _safetensors()
        for f in files:
            try:
                sd.update(st.load_file(f))
            except Exception as e:  # safetensors raises its own error types
                raise ConvertError(f"{f}: cannot be read as safetensors ({str(e).splitlines()[0][:120]})") from None
    else:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise ConvertError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return hf, sd


def from_hf(
    path_or_state_dict: str | Path | dict,
    config: dict | TransformerConfig | None = None,
    max_seq_len: int | None = None,
) -> Transformer:
    """Our Transformer from Llama weights: a Hugging Face directory (config.json + *.safetensors or
    pytorch_model*.bin), a Meta directory (params.json + consolidated.*.pth), or a Hugging Face state
    dict with `config` (its config.json as a dict, or our TransformerConfig). On the CPU, float32.

    max_seq_len: the RoPE table length for a Meta checkpoint (its params.json does not say; default
    params.json's max_seq_len, else 4096).
    """
    if isinstance(path_or_state_dict, dict):
        if config is None:
            raise ConvertError("from_hf(state_dict) needs config= (a Hugging Face config dict or a TransformerConfig)")
        cfg = config if isinstance(config, TransformerConfig) else config_from_hf(config)
        return load_into(cfg, _ours_from_hf(path_or_state_dict, cfg))
    path = Path(path_or_state_dict)
    if (path / "params.json").is_file() and not (path / "config.json").is_file():
        cfg, ours = load_meta_dir(path, max_seq_len)
        return load_into(cfg, ours)
    hf, sd = load_hf_dir(path)
    cfg = config_from_hf(hf)
    return load_into(cfg, _ours_from_hf(sd, cfg))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_hf(model: Transformer, out: str | Path, dtype: str = "float32") -> Path:
    """Write config.json + model.safetensors (loadable by transformers' from_pretrained) into `out`.

    Both files go to temporary names first and are renamed into place, so `out` never holds half a model.
    """
    if dtype not in _DTYPES:
        raise ConvertError(f"--dtype: {dtype!r} is not allowed (allowed: {', '.join(_DTYPES)})")
    st = _safetensors()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(_DTYPES[dtype]) for k, v in to_hf(model).items()}
    tmp_w, tmp_c = out / ".model.safetensors.tmp", out / ".config.json.tmp"
    try:
        st.save_file(weights, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(hf_config(model.config, dtype), indent=2) + "\n")
        tmp_w.replace(out / "model.safetensors")
        tmp_c.replace(out / "config.json")
    finally:
        tmp_w.unlink(missing_ok=True)
        tmp_c.unlink(missing_ok=True)
    return out
