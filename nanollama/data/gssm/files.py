"""Writing GSSM token files (the writer behind `python -m nanollama.data.gssm`, see __main__.py).

Sequence i of a split is row i % CHUNK of `gssm.sample(CHUNK, seq_len + 1, seed=derive_seed(seed,
tag, i // CHUNK))`, the split's tag keeping train and test seeds disjoint (seeds.py). A GSSM
sequence does not depend on the batch it was drawn in, so the files are a pure function of
(graph, seed, seq_len) and the last chunk may be short.

Everything is written into a hidden temporary directory beside DIR, the manifest last, and the
directory then renamed to DIR: a crash leaves no DIR, or the previous one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nanollama.config import to_dict
from nanollama.data import seeds
from nanollama.data.gssm.reader import FORMAT, MANIFEST, DataError, token_dtype
from nanollama.utils.checks import check_int
from nanollama.utils.fileio import fsync_path

CHUNK = 1024  # sequences per sample() call; part of the files' definition, recorded in the manifest
TAGS = {"train": seeds.FILE_TRAIN, "test": seeds.FILE_TEST}


class Progress:
    """A line to `stream` at most every `every` seconds (0: at every update): counts, rate, ETA."""

    def __init__(self, total_tokens: int, every: float = 5.0, stream: TextIO | None = None):
        self.total, self.every, self.stream = total_tokens, every, stream or sys.stderr
        self.done, self.begin = 0, time.perf_counter()
        self.last = self.begin

    def update(self, tokens: int, what: str) -> None:
        self.done += tokens
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.begin, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"{what} | {pct:5.1f}% of {self.total:,} tokens | {rate:,.0f} tokens/s | eta {eta:.0f}s",
                  file=self.stream, flush=True)  # fmt: skip


def _write_split(tmp: Path, gssm: Any, split: str, n: int, seq_len: int, seed: int, hidden: bool, progress: Progress):
    """Sample `n` sequences into tmp/<split>_tokens.npy (and _hidden.npy); returns the manifest entry."""
    row = seq_len + 1
    tokens_file = f"{split}_tokens.npy"
    dtype = token_dtype(gssm.vocab_size)
    tokens = np.lib.format.open_memmap(tmp / tokens_file, mode="w+", dtype=dtype, shape=(n, row))
    entry: dict = {
        "n": n,
        "seed_tag": TAGS[split],
        "tokens": {"file": tokens_file, "shape": [n, row], "dtype": str(dtype)},
    }
    states = None
    if hidden:
        dims = [nd.state_dim for nd in gssm.config.nodes if not nd.observed]
        hidden_file = f"{split}_hidden.npy"
        hdtype = token_dtype(max(dims))
        states = np.lib.format.open_memmap(tmp / hidden_file, mode="w+", dtype=hdtype, shape=(n, row, len(dims)))
        entry["hidden"] = {"file": hidden_file, "shape": [n, row, len(dims)], "dtype": str(hdtype)}
    nll_sum, nll_count = 0.0, 0
    lo_id, hi_id = None, None  # the split's smallest and largest token id, for the reader's range check
    for chunk, lo in enumerate(range(0, n, CHUNK)):
        b = min(CHUNK, n - lo)
        chunk_seed = seeds.derive_seed(seed, TAGS[split], chunk)
        out = gssm.sample(b, row, seed=chunk_seed, return_hidden=hidden)
        toks = out[0] if hidden else out
        tokens[lo : lo + b] = toks.numpy().astype(dtype)
        low, high = int(toks.min()), int(toks.max())
        lo_id, hi_id = (low, high) if lo_id is None else (min(lo_id, low), max(hi_id, high))
        if hidden:
            states[lo : lo + b] = out[1].numpy().astype(states.dtype)
        if split == "test":
            # targets are positions 1..seq_len: what a model reading tokens[:, :-1] predicts
            nll = gssm.nll(toks, seed=chunk_seed)[:, 1:]
            nll_sum += float(nll.double().sum())
            nll_count += nll.numel()
        progress.update(b * row, f"{split}: {lo + b:,}/{n:,} sequences")
    for array, name in ((tokens, tokens_file), (states, entry.get("hidden", {}).get("file"))):
        if array is not None:
            array.flush()
            fsync_path(tmp / name)
    entry["tokens"]["min"], entry["tokens"]["max"] = lo_id, hi_id
    if split == "test":
        entry["bayes_nll"] = nll_sum / nll_count
    return entry


def write_dataset(
    out: str | Path,
    gssm: Any,
    seq_len: int,
    n_train: int,
    n_test: int,
    seed: int,
    hidden: bool = False,
    force: bool = False,
    config: dict | None = None,
    progress_every: float = 5.0,
    stream: TextIO | None = None,
) -> dict:
    """Write DIR = `out` (train and test token files, optional hidden states, manifest.json); returns the manifest.

    `config`: the training config as plain data, recorded in the manifest for provenance.
    Raises DataError if `out` exists (and is not an empty directory) unless `force`.
    """
    try:
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("--train", n_train, 1),
            ("--test", n_test, 1),
            ("seed", seed, 0),
        ):
            check_int(name, value, low)
    except ValueError as e:
        raise DataError(str(e)) from None
    out = Path(out)
    _refuse_overwrite(out, force)
    if hidden and all(nd.observed for nd in gssm.config.nodes):
        raise DataError("--hidden: the graph has no hidden nodes")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        progress = Progress((n_train + n_test) * (seq_len + 1), progress_every, stream)
        manifest = {
            "format": FORMAT,
            "vocab_size": gssm.vocab_size,
            "seq_len": seq_len,
            "seed": seed,
            "graph_seed": int(gssm.seed),
            "chunk": CHUNK,
            "gssm": json.loads(json.dumps(to_dict(gssm.config))),
            "hidden_names": [nd.name for nd in gssm.config.nodes if not nd.observed],
            "splits": {},
        }
        for split, n in (("train", n_train), ("test", n_test)):
            manifest["splits"][split] = _write_split(tmp, gssm, split, n, seq_len, seed, hidden, progress)
        manifest["test_bayes_nll"] = manifest["splits"]["test"]["bayes_nll"]
        manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest["config"] = config
        with open(tmp / MANIFEST, "w") as f:  # last: a directory with a manifest is complete
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _refuse_overwrite(out, force)  # again: another writer may have finished meanwhile
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left after a failure: the rename consumed it
    return manifest


def _refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(f"{out} already exists; pass --force to replace it")


def _replace(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed only after the rename."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
