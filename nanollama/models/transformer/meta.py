"""Meta's consolidated Llama checkpoints (params.json + consolidated.NN.pth) into our names.

Meta's RoPE rotates interleaved pairs (dims 2i, 2i+1 of a head, as one complex number); ours and
Hugging Face's rotate halves (dims i, i + D/2). Reordering each head's q and k rows, even rows
first and odd rows after, turns one into the other: q.k, and so attention, is unchanged, because
q and k are permuted alike (v and wo are not rotated and stay as they are).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nanollama.models.transformer.checkpoint_io import ConvertError, read_json
from nanollama.models.transformer.model import TransformerConfig

# How model-parallel shards split each weight: column-parallel on rows (0), row-parallel and the
# embedding on columns (1); norms are replicated (None).
_SHARD_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "wo": 1,
    "w1": 0,
    "w3": 0,
    "w2": 1,
}
# Llama 3.1's use_scaled_rope: the constants of Meta's reference apply_scaling.
_LLAMA31_SCALING = {
    "type": "llama3",
    "factor": 8.0,
    "original_max_seq_len": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}


def permute_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (Meta) -> half-split rows (ours, Hugging Face): (H*D, dim) -> (H*D, dim).

    Within each head, new row j < D/2 is old row 2j and new row D/2 + j is old row 2j + 1.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, D/2, 2, C) -> (H, 2, D/2, C)


def _merge(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return shards[0]
    out = {}
    for name in shards[0]:
        kind = name.split(".")[-2] if name.count(".") else name
        dim = _SHARD_DIM.get(kind)
        out[name] = shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return out


def load_meta_dir(path: Path, max_seq_len: int | None = None) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(our config, our state dict) of a Meta checkpoint directory, q and k rows permuted."""
    params = read_json(path / "params.json")
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise ConvertError(f"{path}: params.json but no consolidated.*.pth")
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # a truncated or foreign file: torch raises several kinds
            raise ConvertError(f"{f}: cannot be read as a torch checkpoint ({str(e).splitlines()[0][:120]})") from None
    sd = {k: v for k, v in _merge(shards).items() if k != "rope.freqs"}  # old checkpoints saved their RoPE table
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as e:
        raise ConvertError(f"{path / 'params.json'}: missing key {e.args[0]!r}") from None
    n_kv = int(params.get("n_kv_heads") or n_heads)
    emb = sd.get("tok_embeddings.weight")
    if emb is None:
        raise ConvertError(f"{files[0]}: no tok_embeddings.weight (is it a Llama checkpoint?)")
    vocab = int(params.get("vocab_size", -1))
    if vocab > 0 and vocab != emb.shape[0]:
        raise ConvertError(
            f"vocab mismatch: params.json says vocab_size={vocab}, the embedding has {emb.shape[0]} rows"
        )
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    scaling = _LLAMA31_SCALING if params.get("use_scaled_rope") else None
    try:
        cfg = TransformerConfig(
            vocab_size=int(emb.shape[0]),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            max_seq_len=int(max_seq_len or params.get("max_seq_len") or 4096),
            hidden_dim=int(w1.shape[0]) if w1 is not None else None,  # multiple_of and ffn_dim_multiplier, resolved
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=dict(scaling) if scaling else None,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            tie_embeddings="output.weight" not in sd,
        )
    except ValueError as e:
        raise ConvertError(f"{path / 'params.json'}: {e}") from None
    out = {"tok_embeddings.weight": emb, "norm.weight": sd.get("norm.weight")}
    if "output.weight" in sd:
        out["output.weight"] = sd["output.weight"]
    for i in range(n_layers):
        p = f"layers.{i}."
        try:
            wq = permute_meta(sd[p + "attention.wq.weight"], n_heads)
            wk = permute_meta(sd[p + "attention.wk.weight"], n_kv)
            out[p + "attention.wqkv.weight"] = torch.cat([wq, wk, sd[p + "attention.wv.weight"]], dim=0)
            for name in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
                out[p + name + ".weight"] = sd[p + name + ".weight"]
            for name in ("attention_norm", "ffn_norm"):
                out[p + name + ".weight"] = sd[p + name + ".weight"]
        except KeyError as e:
            raise ConvertError(f"{files[0]}: missing {e.args[0]}") from None
    if out["norm.weight"] is None:
        raise ConvertError(f"{files[0]}: missing norm.weight")
    return cfg, out
