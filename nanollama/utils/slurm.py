"""Facts about Slurm jobs shared by the launcher's scripts and the processes they start."""

PORT_BASE = 20000  # rendezvous ports are PORT_BASE + job id % PORT_SPAN: distinct for concurrent jobs on a node
PORT_SPAN = 20000


def rendezvous_port(job_id: int) -> int:
    """The torch.distributed rendezvous port of Slurm job `job_id` (the same formula as `PORT_SHELL`)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


# The same formula for a batch script, where $SLURM_JOB_ID is known only at run time.
PORT_SHELL = f"$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))"
