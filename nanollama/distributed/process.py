"""Where a process stands: the process group and device mesh under torchrun (or srun), or one process alone.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the processes join one group
over an explicit 1-D device mesh ("dp",): NCCL on GPUs, gloo on CPUs; with tensor parallelism
(tp > 1) over a 2-D mesh ("dp", "tp"), tp innermost so that a tensor-parallel group sits inside a
node. A plain `python -m nanollama.train` runs one process without any of it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanollama.utils.checks import ConfigError
from nanollama.utils.slurm import rendezvous_port


@dataclass
class Dist:
    """Where this process stands: rank among world_size, its device, and the mesh (None alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # a DeviceMesh under torchrun: ("dp",), or ("dp", "tp") when tp > 1
    _save_group: object | None = None
    tp: int = 1  # tensor-parallel degree: ranks r with the same r // tp share the data (one dp rank)

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel replicas (what the data stream is keyed by)."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: world_size / tp."""
        return self.world_size // self.tp

    @property
    def save_group(self):
        """A gloo group of all ranks for background checkpoint writes, created once (None alone).

        An asynchronous DCP save runs its collectives (plan exchange, metadata gather) from a thread
        while training goes on: on the training group they would interleave with FSDP's and mismatch.
        Every rank must first ask for it at the same point (its creation is itself a collective).
        """
        if self.distributed and self._save_group is None:
            self._save_group = dist.new_group(backend="gloo")
        return self._save_group

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

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a picklable value)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def init(device: str = "auto", timeout_s: float = 300.0, tp: int = 1) -> Dist:
    """Join the process group when launched by torchrun; otherwise a single process on `device`.

    tp > 1: a ("dp", "tp") mesh of world_size / tp x tp ranks (torchrun required, world_size % tp == 0).
    """
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is available")
    _adopt_slurm_environment()
    if "RANK" not in os.environ:
        if tp > 1:
            raise ConfigError("parallel.tp", f"tp={tp} needs several processes: launch with torchrun (or srun)")
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world % tp:
        raise ConfigError("parallel.tp", f"tp={tp} does not divide the world size {world} (world = dp x tp)")
    if want_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    # A bounded timeout: if a rank dies, the others fail their next collective instead of hanging.
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timeout, device_id=dev if want_cuda else None)
    from torch.distributed.device_mesh import init_device_mesh

    if tp > 1:  # tp innermost: consecutive ranks (one node's GPUs) form a tensor-parallel group
        mesh = init_device_mesh(dev.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    else:
        mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev, mesh=mesh, tp=tp)


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
    os.environ.setdefault("MASTER_PORT", str(rendezvous_port(int(os.environ.get("SLURM_JOB_ID", "0")))))
