"""Writing GSSM token files: `python -m nanollama.data.gssm CONFIG --out DIR --train N --test M`.

Sequence i of a split is row i % CHUNK of `gssm.sample(CHUNK, seq_len + 1, seed=derive_seed(seed,
tag, i // CHUNK))`, the split's tag keeping train and test seeds disjoint (seeds.py). A GSSM
sequence does not depend on the batch it was drawn in, so the files are a pure function of
(graph, seed, seq_len) and the last chunk may be short.

Everything is written into a hidden temporary directory beside DIR, the manifest last, and the
directory then renamed to DIR: a crash leaves no DIR, or the previous one, never half of one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from nanollama.data import seeds
from nanollama.data.reader import FORMAT, MANIFEST, DataError, token_dtype
from nanollama.fileio import fsync_path

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
    for chunk, lo in enumerate(range(0, n, CHUNK)):
        b = min(CHUNK, n - lo)
        chunk_seed = seeds.derive_seed(seed, TAGS[split], chunk)
        out = gssm.sample(b, row, seed=chunk_seed, return_hidden=hidden)
        toks = out[0] if hidden else out
        tokens[lo : lo + b] = toks.numpy().astype(dtype)
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
    for name, value, low in (
        ("seq_len", seq_len, 1),
        ("--train", n_train, 1),
        ("--test", n_test, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
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
        from nanollama.config import to_dict

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
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """The CLI: sample a run config's GSSM into train/test token files."""
    p = _Parser(
        prog="python -m nanollama.data.gssm",
        description="Write GSSM token files (train and test splits, manifest.json) for data.source=files.",
    )
    p.add_argument("config", help="training config YAML (its data.gssm, data.graph_seed, data.seq_len are used)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.seq_len=256")
    p.add_argument("--out", required=True, help="output directory (created; must not exist unless --force)")
    p.add_argument("--train", type=int, required=True, help="number of train sequences")
    p.add_argument("--test", type=int, required=True, help="number of test sequences")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    p.add_argument("--hidden", action="store_true", help="also write the hidden states")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines (stderr)")
    args = p.parse_intermixed_args(argv)

    from nanollama.config import ConfigError, load, to_dict
    from nanollama.data.gssm import GSSM
    from nanollama.run_config import TrainConfig

    try:
        cfg = load(TrainConfig, args.config, args.overrides)
        gssm = GSSM(cfg.data.gssm, seed=cfg.data.graph_seed)
        seed = cfg.seed if args.seed is None else args.seed
        manifest = write_dataset(
            args.out,
            gssm,
            cfg.data.seq_len,
            args.train,
            args.test,
            seed,
            hidden=args.hidden,
            force=args.force,
            config=to_dict(cfg),
            progress_every=args.progress_every,
        )
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: train {args.train} x {cfg.data.seq_len + 1} and test {args.test} x "
        f"{cfg.data.seq_len + 1} tokens ({manifest['splits']['train']['tokens']['dtype']}); "
        f"test Bayes-optimal NLL {manifest['test_bayes_nll']:.4f} nats/token",
        file=sys.stderr,
    )
    return 0
