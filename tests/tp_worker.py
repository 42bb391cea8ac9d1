"""Run under torchrun (2 gloo processes) by test_tensor_parallel: a tp=2 Transformer (GQA, with and without
sequence parallelism) against the same model in one piece, forward and prefill + decode with head-sharded
KV caches. Exits non-zero on a mismatch."""

import torch

from nanollama import distributed, models
from nanollama.models.transformer import KVCache, TransformerConfig


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    dist = distributed.init("cpu", 60.0, tp=2)
    cfg = TransformerConfig(vocab_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    reference = models.build(cfg)
    tokens = torch.randint(0, 24, (2, 12), generator=torch.Generator().manual_seed(1))
    for sequence_parallel in (False, True):
        with torch.device("meta"):
            model = models.build(cfg)
        distributed.shard(model, dist.mesh, "fp32", sequence_parallel=sequence_parallel)
        model.to_empty(device="cpu")
        model.reset_buffers()
        distributed.init_weights(model, 0)
        assert model.layers[0].attention.n_heads == 2 and model.layers[0].attention.n_kv_heads == 1
        with torch.no_grad():
            error = (full(model(tokens)) - reference(tokens)).abs().max().item()
            assert error < 1e-5, ("forward", sequence_parallel, error)
            if sequence_parallel:
                continue  # one decode token cannot be split over the sequence
            outs = []
            for m in (model, reference):
                cache = KVCache.for_model(m, 2, 20)
                prefill = full(m(tokens, cache=cache))
                cache.start_decode(torch.tensor([12, 12]))
                outs.append((prefill, full(m(tokens[:, :1], cache=cache)), cache.k[0].shape[1]))
            assert outs[0][2] == 1 and outs[1][2] == 2, "the TP cache holds the local kv heads"
            for a, b in zip(outs[0][:2], outs[1][:2]):
                assert (a - b).abs().max().item() < 1e-5, ("decode", (a - b).abs().max().item())
    if dist.is_main:
        print("tp worker: forward, sequence parallel and head-sharded decode match", flush=True)
    dist.close()


if __name__ == "__main__":
    main()
