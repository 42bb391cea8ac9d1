"""Process groups, FSDP2 sharding, mixed precision, activation checkpointing and compile.

The model knows nothing of torch.distributed: everything that does lives here. Under torchrun
(RANK / WORLD_SIZE / LOCAL_RANK in the environment) the trainer shards the model with FSDP2 over
an explicit 1-D device mesh: NCCL on GPUs, gloo on CPUs. A plain `python -m nanollama.train`
runs one process without any of it.
"""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from nanollama.config import ConfigError


@dataclass
class Dist:
    """Where this process stands: rank among world_size, its device, and the mesh (None alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # a DeviceMesh under torchrun

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (so all ranks stop at the same step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init(device: str = "auto", timeout_s: float = 300.0) -> Dist:
    """Join the process group when launched by torchrun; otherwise a single process on `device`."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is available")
    _adopt_slurm_environment()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    # A bounded timeout: if a rank dies, the others fail their next collective instead of hanging.
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timeout, device_id=dev if want_cuda else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, mesh=mesh)


def _adopt_slurm_environment() -> None:
    """Processes started by `srun` (several tasks, no torchrun) take their ranks from Slurm's variables.

    The rendezvous is the first node of the job on a port derived from the job id, unless
    MASTER_ADDR / MASTER_PORT are already set.
    """
    # SLURM_STEP_NUM_TASKS exists inside an srun step only: a batch script of a multi-task job (which
    # has SLURM_NTASKS too) must not wait for peers that were never started.
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if "RANK" in os.environ or tasks <= 1 or "SLURM_PROCID" not in os.environ:
        return
    import subprocess

    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(tasks), LOCAL_RANK=os.environ["SLURM_LOCALID"])
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0] if hosts else "localhost"
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def shard(model: torch.nn.Module, mesh, precision: str, reduce_dtype: str = "fp32") -> None:
    """FSDP2 on each block, then the root. bf16 parameters and compute with fp32 (or bf16) reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise ConfigError("precision", "fp16 is not supported under FSDP (use bf16, which needs no loss scaling)")
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        reduce = torch.float32 if reduce_dtype == "fp32" else torch.bfloat16
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Fill (possibly sharded) parameters with the model's deterministic initial values.

    Each parameter's full value comes from `model.initial_value(name, seed)` (seeded per parameter), and
    a sharded parameter keeps its own shard of it: the same weights whatever the world size, which
    is what makes 1-rank and 2-rank runs comparable.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            full = model.initial_value(name, seed)
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements))
            else:
                p.copy_(full)


# Ops whose outputs selective checkpointing keeps; everything else (norms, activations, rotations)
# is recomputed in the backward pass. Matmuls are the expensive part to redo.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward: `full` all of them, `selective` all but matmuls."""
    if mode == "none":
        return
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    for block in model.layers:
        forward = block.forward
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _policy)
        # An instance attribute, not a wrapper module, so parameter names (and checkpoints) are unchanged.
        block.forward = functools.partial(checkpoint, forward, **kwargs)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each block (one graph reused by every layer: the blocks share code and shapes)."""
    for block in model.layers:
        block.compile()
