"""Atomic, sharded checkpoints in run_dir/checkpoints/step_XXXXXXXX/, keeping the last k.

Layout of one checkpoint:
    dcp/                      model and optimizer, torch.distributed.checkpoint (sharded, reshardable)
    train_state_rank{r}.pt    each rank's step, data stream position and RNG states
    COMPLETE                  the commit marker (JSON: step, world_size), written last
    EVAL_PENDING              present while an evaluation still has to read this checkpoint

Every rank writes into a temporary directory; once all have finished, rank 0 writes the marker and
renames the directory into place. Loading considers only directories with the marker, so a crash
mid-write never leaves something that looks like the latest checkpoint. Keep-last-k never deletes
a checkpoint that is still pending evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanollama.utils.fileio import fsync_path

# DCP warns on every single-process save and load, which is our normal case without torchrun.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
EVAL_PENDING = "EVAL_PENDING"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_steps(root: str | Path) -> list[int]:
    """Steps of the complete checkpoints under root, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest(root: str | Path) -> Path | None:
    steps = complete_steps(root)
    return step_dir(root, steps[-1]) if steps else None


def info(path: str | Path) -> dict:
    """The marker's content ({step, world_size}); raises FileNotFoundError for an incomplete checkpoint."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return json.loads(marker.read_text())


def pending_evaluation(root: str | Path) -> list[Path]:
    return [step_dir(root, s) for s in complete_steps(root) if (step_dir(root, s) / EVAL_PENDING).exists()]


def mark_evaluated(path: str | Path) -> None:
    (Path(path) / EVAL_PENDING).unlink(missing_ok=True)


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the last `keep` complete checkpoints (sparing those pending evaluation)."""
    for step in complete_steps(root)[:-keep]:
        path = step_dir(root, step)
        if not (path / EVAL_PENDING).exists():
            (path / MARKER).unlink()  # first: a deletion cut short leaves no "complete" checkpoint
            shutil.rmtree(path, ignore_errors=True)


def load_model(path: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unsharded model (for evaluation and generation)."""
    info(path)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=Path(path) / "dcp", no_dist=True)
    model.load_state_dict(state["model"])


class Checkpointer:
    """Saves and restores model + optimizer (sharded) and each rank's train state.

    `dist` is a parallel.Dist (rank, world_size, barrier). With `async_save`, the model and optimizer
    are copied to host memory and written in the background; the commit happens in `wait()`, which
    the next save (and the end of training) calls.
    """

    def __init__(self, root: str | Path, dist, keep: int, eval_every: int = 0, async_save: bool = False):
        self.root, self.dist, self.keep = Path(root), dist, keep
        self.eval_every, self.async_save = eval_every, async_save
        self._pending: tuple[Any, Path, int] | None = None  # (future, tmp dir, step)

    def save(self, step: int, model, optimizer, train_state: dict) -> Path:
        self.wait()
        tmp = self.root / f".tmp-step_{step:08d}"
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with open(tmp / f"train_state_rank{self.dist.rank}.pt", "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=tmp / "dcp", no_dist=not self.dist.distributed)
            self._pending = (future, tmp, step)
        else:
            dcp.save(state, checkpoint_id=tmp / "dcp", no_dist=not self.dist.distributed)
            self._commit(tmp, step)
        return step_dir(self.root, step)

    def wait(self) -> None:
        """Finish and commit a pending asynchronous save."""
        if self._pending is not None:
            future, tmp, step = self._pending
            self._pending = None
            future.result()
            self._commit(tmp, step)

    def _commit(self, tmp: Path, step: int) -> None:
        self.dist.barrier()  # every rank's files are on disk
        if self.dist.is_main:
            if self.eval_every and step % self.eval_every == 0:
                (tmp / EVAL_PENDING).touch()
            with open(tmp / MARKER, "w") as f:
                json.dump({"step": step, "world_size": self.dist.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            final = step_dir(self.root, step)
            old = None
            if final.exists():  # re-saving a step, e.g. a relaunch at the end of training
                old = self.root / f".tmp-old-step_{step:08d}"
                os.rename(final, old)  # out of the way first: `final` is never a half-deleted checkpoint
            os.rename(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            fsync_path(self.root)
            prune(self.root, self.keep)
        self.dist.barrier()  # nobody reads `latest` before the rename

    def load(self, path: Path, model, optimizer) -> tuple[dict, int]:
        """Restore model and optimizer (resharding if needed); returns (train state, saved world size).

        The train state is this rank's own when the world size is unchanged, else rank 0's (whose
        step is what a resharded run continues from).
        """
        saved_world = info(path)["world_size"]
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=not self.dist.distributed)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=True),
        )
        rank = self.dist.rank if saved_world == self.dist.world_size else 0
        train_state = torch.load(path / f"train_state_rank{rank}.pt", weights_only=False)
        return train_state, saved_world

    def clean_stale(self) -> None:
        """Remove leftovers of interrupted writes (rank 0, at start)."""
        if self.dist.is_main and self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(".tmp-step_"):
                    shutil.rmtree(entry, ignore_errors=True)
        self.dist.barrier()
