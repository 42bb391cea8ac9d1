"""The Llama-style Transformer (model.py), its generation state, the static KV cache (cache.py), and
Llama-format weights in and out (hf.py: Hugging Face; meta.py: Meta's consolidated checkpoints)."""

from nanollama.models.registry import ModelSpec, TensorParallelPlan
from nanollama.models.transformer import parallelize
from nanollama.models.transformer.cache import KVCache
from nanollama.models.transformer.checkpoint_io import ConvertError
from nanollama.models.transformer.hf import from_hf, hf_config, save_hf, to_hf
from nanollama.models.transformer.model import Transformer, TransformerConfig

SPEC = ModelSpec(
    arch="transformer",
    config=TransformerConfig,
    build=Transformer,
    blocks=lambda model: list(model.layers),
    initial_value=lambda model, name, seed: model.initial_value(name, seed),
    flops_per_token=lambda model, seq_len: model.flops_per_token(seq_len),
    recompute_flops_per_token=lambda model, seq_len: model.recompute_flops_per_token(seq_len),
    num_params=lambda model, embeddings=True: model.num_params(embeddings),
    reset_buffers=lambda model: model.reset_buffers(),
    new_state=lambda model, batch_size, max_len, dtype=None: KVCache.for_model(model, batch_size, max_len, dtype),
    tensor_parallel=TensorParallelPlan(check=parallelize.check, apply=parallelize.apply),
)

__all__ = [
    "SPEC",
    "ConvertError",
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "from_hf",
    "hf_config",
    "save_hf",
    "to_hf",
]
