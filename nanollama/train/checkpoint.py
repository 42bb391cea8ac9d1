"""Atomic, verified, sharded checkpoints in run_dir/checkpoints/step_XXXXXXXX/, keeping the last k.

Layout of one checkpoint:
    dcp/                      model and optimizer, torch.distributed.checkpoint (sharded, reshardable)
    train_state_rank{r}.pt    each rank's step, data stream position and RNG states
    COMPLETE                  the commit marker (JSON: step, world_size, and each file's size and CRC-32), written last
    EVAL_PENDING              present while an evaluation still has to read this checkpoint

Every rank writes into a temporary directory; once all have finished, rank 0 checksums the files,
writes the marker and renames the directory into place. Loading considers only directories with
the marker, so a crash mid-write never leaves something that looks like the latest checkpoint, and
`verify` re-checks every file against the marker before a load: a truncated, missing or flipped
file is reported by name and the run falls back to the newest intact checkpoint (the damaged one
is renamed to damaged-step_XXXXXXXX, never deleted). Checkpoints written before checksums existed
are verified for the presence of their files only. Keep-last-k never deletes a checkpoint that is
still pending evaluation.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nanollama.distributed import tensor_parallel
from nanollama.train.checkpoint_files import (
    _STEP_DIR,
    EVAL_PENDING,
    MARKER,
    complete_steps,
    crc32,
    file_names,
    info,
    latest,
    manifest,
    step_dir,
    verify,
)
from nanollama.utils.fileio import fsync_path

__all__ = [  # the directory functions live in checkpoint_files.py; callers use them from here
    "EVAL_PENDING",
    "MARKER",
    "Checkpointer",
    "CheckpointError",
    "complete_steps",
    "crc32",
    "file_names",
    "info",
    "latest",
    "load_model",
    "manifest",
    "newest_intact",
    "prune",
    "step_dir",
    "verify",
]

# DCP warns on every single-process save and load, which is our normal case without torchrun.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

DAMAGED = "damaged-"  # prefix of a checkpoint set aside because a file failed verification
_TMP_DIR = re.compile(r"^\.tmp-(?:old-)?step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint problem a user can act on, in one line (damaged files, a full disk)."""


class DiskFull(CheckpointError):
    pass


def newest_intact(
    root: str | Path,
    report: Callable[[str], None] = print,
    check: Callable[[Path], str | None] = verify,
    steps: list[int] | None = None,
    set_aside: bool = True,
) -> Path | None:
    """The newest complete checkpoint (of `steps`, default all) that passes `check`; damaged newer
    ones are reported and set aside.

    A damaged checkpoint is renamed to damaged-step_XXXXXXXX (kept for inspection, never deleted):
    out of the way of keep-last-k, which would otherwise count it and delete the intact fallback,
    and of the re-save of its step. Raises CheckpointError if there are checkpoints but none is intact
    (and then sets nothing aside): starting afresh over a run's history must be the user's choice.
    """
    root = Path(root)
    damaged = []
    for step in reversed(complete_steps(root) if steps is None else steps):
        path = step_dir(root, step)
        problem = check(path)
        if problem is None:
            for bad, why in damaged:
                aside = _unused(root / f"{DAMAGED}{bad.name}")
                if set_aside:
                    os.rename(bad, aside)
                report(f"damaged checkpoint: {why}; set aside as {aside.name}, falling back to {path.name}")
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint in {root}: {damaged[0][1]}"
            + (f" (and {len(damaged) - 1} older ones damaged)" if len(damaged) > 1 else "")
            + "; repair it, or move the checkpoints away to start afresh"
        )
    return None


def _unused(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n, candidate = n + 1, path.with_name(f"{path.name}.{n}")
    return candidate


def pending_evaluation(root: str | Path) -> list[Path]:
    return [step_dir(root, s) for s in complete_steps(root) if (step_dir(root, s) / EVAL_PENDING).exists()]


def mark_evaluated(path: str | Path) -> None:
    (Path(path) / EVAL_PENDING).unlink(missing_ok=True)


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the last `keep` complete checkpoints (sparing those pending evaluation)."""
    for step in complete_steps(root)[:-keep]:
        path = step_dir(root, step)
        if not (path / EVAL_PENDING).exists():
            # first: a deletion cut short leaves no "complete" checkpoint; another pruner (evaluate) may be first
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(root: str | Path, report: Callable[[str], None] = print) -> None:
    """Remove what interrupted writes and prunes left: marker-less step_* and .tmp-* directories.

    A complete one is never removed: a .tmp-step_X (or .tmp-old-step_X) with its marker, caught
    between the renames of a commit, is moved into place as step_X if there is none.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir(), key=lambda e: not e.name.startswith(".tmp-step_")):  # the newer first
        tmp, final = _TMP_DIR.match(entry.name), _STEP_DIR.match(entry.name)
        if tmp and (entry / MARKER).is_file() and not step_dir(root, int(tmp.group(1))).exists():
            os.rename(entry, step_dir(root, int(tmp.group(1))))
            report(f"finished the commit of {step_dir(root, int(tmp.group(1))).name} (found as {entry.name})")
        elif (tmp or entry.name.startswith(".tmp-")) or (final and not (entry / MARKER).exists()):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            report(f"removed the leftover {entry.name} of an interrupted write or prune")
    fsync_path(root)


def load_model(path: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into an unsharded model (for evaluation and generation), verified first."""
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"damaged checkpoint: {problem}")
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=Path(path) / "dcp", no_dist=True)
    except CheckpointException as e:  # e.g. a config.yaml that describes another model than the weights
        first = str(e).strip().splitlines()[-1][:200]
        raise CheckpointError(f"{path} does not fit the run's config.yaml model: {first}") from None
    model.load_state_dict(state["model"])


def _disk_full(e: BaseException) -> bool:
    """Whether an error (or one it wraps, e.g. in DCP's CheckpointException) is a full disk or quota."""
    seen, todo = set(), [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and "unexpected pos" in str(e):  # torch.save's zip writer on ENOSPC
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            todo += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
    return False


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Checkpointer:
    """Saves and restores model + optimizer (sharded) and each rank's train state.

    `dist` is a distributed.Dist (rank, world_size, barrier). With `async_save`, the model and
    optimizer are copied to host memory and written in the background over a process group of
    their own; the commit happens in `wait()`, which the next save (and the end of training) calls.
    On a full disk a save raises DiskFull (one line: the directory, the space needed) after
    removing its own partial files; the older checkpoints are untouched.
    """

    def __init__(self, root: str | Path, dist, keep: int, eval_every: int = 0, async_save: bool = False):
        self.root, self.dist, self.keep = Path(root), dist, keep
        self.eval_every, self.async_save = eval_every, async_save
        self._pending: tuple[Any, Path, int, int] | None = None  # (future, tmp dir, step, bytes estimate)

    def save(self, step: int, model, optimizer, train_state: dict) -> Path:
        self.wait()
        tmp = self.root / f".tmp-step_{step:08d}"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        tensor_parallel.to_checkpoint_layout(model, state)  # one layout on disk whatever the mesh
        needed = self._estimate(state)
        failure = None
        if self.dist.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                failure = e
        if self.dist.any(failure is not None):  # (a collective: also the barrier before anyone writes)
            self._failed(tmp, step, needed, failure)
        try:
            # Serialised in memory first: torch.save straight to a full disk fails with an opaque
            # "unexpected pos" error instead of ENOSPC.
            buf = io.BytesIO()
            torch.save(train_state, buf)
            with open(tmp / f"train_state_rank{self.dist.rank}.pt", "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            failure = e
        if self.dist.any(failure is not None):  # every rank gives up together
            self._failed(tmp, step, needed, failure)
        no_dist = not self.dist.distributed
        try:
            if self.async_save:
                future = dcp.async_save(
                    state, checkpoint_id=tmp / "dcp", no_dist=no_dist, process_group=self.dist.save_group
                )
                self._pending = (future, tmp, step, needed)
            else:
                dcp.save(state, checkpoint_id=tmp / "dcp", no_dist=no_dist)
        except (Exception, CheckpointException) as e:  # DCP raises a BaseException
            self._failed(tmp, step, needed, e)
        if not self.async_save:
            self._commit(tmp, step, needed)
        return step_dir(self.root, step)

    def wait(self) -> None:
        """Finish and commit a pending asynchronous save."""
        if self._pending is not None:
            future, tmp, step, needed = self._pending
            self._pending = None
            try:
                future.result()
            except (Exception, CheckpointException) as e:
                self._failed(tmp, step, needed, e)
            self._commit(tmp, step, needed)

    def _estimate(self, state: dict) -> int:
        """Bytes a checkpoint needs: the previous one's size, else the tensors' (the whole world's)."""
        previous = latest(self.root)
        if previous is not None:
            return _size(previous)
        local = 0
        for section in state.values():
            for value in _leaves(section):
                if isinstance(value, torch.Tensor):
                    t = value.to_local() if hasattr(value, "to_local") else value
                    local += t.numel() * t.element_size()
        return local * self.dist.world_size

    def _failed(self, tmp: Path, step: int, needed: int, error: BaseException | None) -> None:
        """Clean up a failed save, then raise DiskFull (one line) or the original error."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None or _disk_full(error):  # None: another rank's write failed
            free = shutil.disk_usage(self.root).free
            raise DiskFull(
                f"no space left in {self.root} for the checkpoint of step {step}: about {needed / 2**20:.1f} MiB "
                f"needed, {free / 2**20:.1f} MiB free; older checkpoints are intact (free space and relaunch)"
            ) from None
        raise error

    def _commit(self, tmp: Path, step: int, needed: int) -> None:
        self.dist.barrier()  # every rank's files are on disk
        # Every rank checksums a share of the files (the listing is rank 0's, so all agree on it).
        rank, world = self.dist.rank, self.dist.world_size
        names = self.dist.broadcast(file_names(tmp) if self.dist.is_main else None)
        parts = self.dist.gather(manifest(tmp, names[rank::world]))
        failure = None
        if self.dist.is_main:
            files = dict(sorted(kv for part in parts for kv in part.items()))
            try:
                marker = {"step": step, "world_size": world, "files": files}
                if getattr(self.dist, "tp", 1) > 1:  # the mesh: world_size / tp data-parallel ranks
                    marker["tp"] = self.dist.tp
                self._publish(tmp, step, marker)
            except OSError as e:  # e.g. no space left for the marker
                failure = e
        if self.dist.any(failure is not None):  # (a collective: nobody reads `latest` before the rename)
            self._failed(tmp, step, needed, failure)

    def _publish(self, tmp: Path, step: int, marker: dict) -> None:
        """Rank 0: write the marker, rename the directory into place, prune."""
        if self.eval_every and step % self.eval_every == 0:
            (tmp / EVAL_PENDING).touch()
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
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

    def choose(self, report: Callable[[str], None]) -> Path | None:
        """The checkpoint to resume from: newest_intact, with the ranks sharing the verification.

        Every rank reads a share of each candidate's files and all learn every share's verdict, so
        they take the same choice (or raise the same error); rank 0 alone reports and sets aside.
        """
        rank, world = self.dist.rank, self.dist.world_size
        steps = self.dist.broadcast(complete_steps(self.root) if self.dist.is_main else None)

        def check(path: Path) -> str | None:
            return next((p for p in self.dist.gather(verify(path, (rank, world))) if p), None)

        main = self.dist.is_main
        return newest_intact(self.root, report if main else lambda _: None, check, steps, set_aside=main)

    def load(self, path: Path, model, optimizer) -> tuple[dict, int]:
        """Restore model and optimizer (resharding if needed); returns (train state, saved data-parallel size).

        The data-parallel size is the world size without tensor parallelism (world / tp with it). The
        train state is this rank's data-parallel replica's when that size is unchanged (its first
        tensor-parallel rank's), else rank 0's (whose step is what a resharded run continues from).
        """
        marker = info(path)
        saved_tp = marker.get("tp", 1)
        saved_dp = marker["world_size"] // saved_tp
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        restore = tensor_parallel.from_checkpoint_layout(model, state)
        dcp.load(state, checkpoint_id=path / "dcp", no_dist=not self.dist.distributed)
        restore()
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=True),
        )
        tp, dp = getattr(self.dist, "tp", 1), self.dist.world_size // getattr(self.dist, "tp", 1)
        rank = (self.dist.rank // tp) * saved_tp if saved_dp == dp else 0
        train_state = torch.load(path / f"train_state_rank{rank}.pt", weights_only=False)
        return train_state, saved_dp


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree
