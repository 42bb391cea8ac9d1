"""Activations under FSDP2 (2 gloo ranks on the CPU) equal those of the unsharded model, layer by layer.

The test launches this file under torchrun; each rank shards a copy of the same model (every block,
then the root, as the trainer does), captures activations of its own tokens through the hooks and
compares them with the unsharded model's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_activations_under_fsdp_match_the_unsharded_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NANOLLAMA_ATTENTION": "sdpa"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0"]
    proc = subprocess.run([*launcher, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1"]


def _worker(out: Path) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nanollama import models
    from nanollama.distributed.fsdp import shard
    from nanollama.models.transformer.model import TransformerConfig
    from nanollama.probe import activations

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = TransformerConfig(vocab_size=13, dim=32, n_layers=3, n_heads=4, max_seq_len=16)
    reference = models.build(cfg).eval()  # seed-0 weights, the same on both ranks
    sharded = models.build(cfg)
    shard(sharded, init_device_mesh("cpu", (2,)), "fp32")
    sharded.eval()
    tokens = torch.randint(0, 13, (2, 16), generator=torch.Generator().manual_seed(rank))  # each rank its own rows
    want = activations(reference, tokens, sites=("resid", "attn", "mlp"))
    got = activations(sharded, tokens, sites=("resid", "attn", "mlp"))
    assert list(got) == list(want) and len(got) == 1 + 3 * 3 + 1
    for key in want:
        assert not hasattr(got[key], "placements"), key  # a plain tensor, not a DTensor shard
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    (out / f"ok{rank}").touch()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
