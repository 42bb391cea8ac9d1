"""Prepared token shards: `prepare` writes them, PreparedCorpus reads them memory-mapped.

A prepared directory holds manifest.json (format, tokenizer identity, dtype, counts, SHA-256 of
every file) and per shard NAME.bin (the documents' tokens back to back, uint16 or uint32, no end
tokens) and NAME.idx.npy (int64 document boundaries, documents + 1 of them). The directory is
built under a temporary name and renamed when complete: a half-prepared one is never read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanollama.data.source import DataError
from nanollama.data.text import files
from nanollama.data.text.tokenizers import Tokenizer, load_tokenizer
from nanollama.utils.fileio import write_atomic

FORMAT = "nanollama.text.v1"
PIECE_DOCS = 256  # documents per piece of a shard: the unit a rank or worker owns
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def choose_dtype(dtype: str, tokenizer: Tokenizer, out: str | Path) -> str:
    """`auto` -> the smallest that holds the tokenizer's ids; uint16 with ids over 65535 is refused."""
    top = tokenizer.vocab_size - 1
    if dtype == "auto":
        return "uint16" if top < 2**16 else "uint32"
    if dtype not in DTYPES:
        raise DataError(f"--dtype {dtype}: must be auto, uint16 or uint32")
    if dtype == "uint16" and top >= 2**16:
        raise DataError(f"{out}: --dtype uint16 cannot hold token ids up to {top} of {tokenizer.spec}; use uint32")
    return dtype


_worker_tokenizer: dict[str, Tokenizer] = {}


def _tokenize_file(task: tuple[str, str, str, str]) -> tuple[str, np.ndarray, np.ndarray, int]:
    """One file's documents: (path, tokens back to back, their lengths, records skipped); runs in a pool worker."""
    path, text_field, on_bad, spec = task
    tok = _worker_tokenizer.get(spec) or _worker_tokenizer.setdefault(spec, load_tokenizer(spec))
    reader = files.PieceReader(Path(path), text_field, on_bad)
    docs = [tok.encode(text) for _, _, text in reader.docs(files.Piece(0, 0, 1 << 62), None) if text]
    docs = [d for d in docs if len(d)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    return path, tokens, lengths, reader.bad


def prepare(
    sources: list[str],
    tokenizer: str,
    out: str | Path,
    *,
    text_field: str = "text",
    dtype: str = "auto",
    workers: int = 1,
    on_bad_record: str = "fail",
    shard_tokens: int = 2**26,
    force: bool = False,
    progress_every: float = 5.0,
) -> dict:
    """Tokenize every file of `sources` into shards under `out`; returns the manifest. Checks everything first."""
    out = Path(out)
    tok = load_tokenizer(tokenizer)
    dtype = choose_dtype(dtype, tok, out)
    paths = [str(f) for s in sources for f in files.resolve(s)[1] if f.stat().st_size > 0]
    if out.exists() and not force:
        raise DataError(f"{out}: exists (use --force to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write(tmp, paths, tok, dtype, text_field, on_bad_record, workers, shard_tokens, progress_every)
        manifest["sources"] = list(sources)
        write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(tmp, paths, tok, dtype, text_field, on_bad, workers, shard_tokens, progress_every) -> dict:
    tasks = [(p, text_field, on_bad, tok.spec) for p in paths]
    shards, pending, lengths = [], [], []
    totals = {"documents": 0, "tokens": 0, "bad_records": 0}
    clock = last = time.perf_counter()

    def flush():
        if not lengths:
            return
        name = f"shard_{len(shards):05d}"
        tokens = np.concatenate(pending).astype(DTYPES[dtype])
        bounds = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        tokens.tofile(tmp / f"{name}.bin")
        np.save(tmp / f"{name}.idx.npy", bounds)
        shards.append(
            {
                "name": name,
                "tokens": int(len(tokens)),
                "documents": int(len(bounds) - 1),
                "sha256_bin": _sha256(tmp / f"{name}.bin"),
                "sha256_idx": _sha256(tmp / f"{name}.idx.npy"),
            }
        )
        pending.clear()
        lengths.clear()

    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_tokenize_file, tasks, chunksize=4) if pool else map(_tokenize_file, tasks)
        for done, (path, tokens, lens, bad) in enumerate(results, 1):
            if dtype == "uint16" and len(tokens) and int(tokens.max()) >= 2**16:
                raise DataError(f"{path}: token id {int(tokens.max())} does not fit a uint16 shard; use --dtype uint32")
            pending.append(tokens)
            lengths.append(lens)
            totals["documents"] += len(lens)
            totals["tokens"] += len(tokens)
            totals["bad_records"] += bad
            if sum(len(t) for t in pending) >= shard_tokens:
                flush()
            now = time.perf_counter()
            if now - last >= progress_every or done == len(tasks):
                rate = totals["tokens"] / max(now - clock, 1e-9)
                print(
                    f"prepare: {done}/{len(tasks)} files, {totals['documents']} documents, "
                    f"{totals['tokens']:,} tokens, {rate:,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
                last = now
        flush()
    finally:
        if pool is not None:
            pool.terminate()
    if totals["documents"] == 0:
        raise DataError(f"{', '.join(paths[:3])}: empty source (no documents with text)")
    return {"format": FORMAT, "tokenizer": tok.identity(), "dtype": dtype, **totals, "shards": shards}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: str | Path) -> None:
    """Recompute every file's SHA-256 against the manifest (DataError naming the first that differs)."""
    path = Path(path)
    for s in read_manifest(path)["shards"]:
        for suffix, key in ((".bin", "sha256_bin"), (".idx.npy", "sha256_idx")):
            if _sha256(path / f"{s['name']}{suffix}") != s[key]:
                raise DataError(f"{path / (s['name'] + suffix)}: checksum differs from manifest.json")


def read_manifest(path: Path) -> dict:
    where = path / "manifest.json"
    try:
        manifest = json.loads(where.read_text())
    except FileNotFoundError:
        raise DataError(f"{where}: no such file (data.prepared wants a directory written by prepare)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a prepare manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not a {FORMAT} manifest")
    return manifest


class PreparedCorpus:
    """A prepared directory's shards, read memory-mapped; pieces of PIECE_DOCS documents."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer):
        self.path = Path(path)
        self.name = str(path)
        self.manifest = read_manifest(self.path)
        saved, ours = self.manifest["tokenizer"], tokenizer.identity()
        if any(saved.get(k) != ours.get(k) for k in ("kind", "vocab_size", "eos_id", "sha256")):
            raise DataError(
                f"{self.path}: prepared with tokenizer {saved.get('spec')} (vocab {saved.get('vocab_size')}), "
                f"but data.tokenizer={tokenizer.spec} (vocab {tokenizer.vocab_size}) differs"
            )
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.shards = self.manifest["shards"]
        for s in self.shards:
            size = (self.path / f"{s['name']}.bin").stat().st_size if (self.path / f"{s['name']}.bin").exists() else -1
            if size != s["tokens"] * np.dtype(self.dtype).itemsize:
                raise DataError(
                    f"{self.path / s['name']}.bin: missing or not {s['tokens']} tokens as the manifest says"
                )
        self.pieces = [
            (i, lo, min(lo + PIECE_DOCS, s["documents"]))
            for i, s in enumerate(self.shards)
            for lo in range(0, s["documents"], PIECE_DOCS)
        ]
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bad = 0

    def _open(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._maps:  # opened lazily, in the worker that reads it
            name = self.shards[shard]["name"]
            tokens = np.memmap(self.path / f"{name}.bin", dtype=self.dtype, mode="r")
            self._maps[shard] = (tokens, np.load(self.path / f"{name}.idx.npy"))
        return self._maps[shard]

    def key(self, piece: int, start: int) -> str:
        return f"{self.shards[self.pieces[piece][0]]['name']}:{start}"

    def docs(self, piece: int, offset: int | None, tokenize: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
        shard, lo, hi = self.pieces[piece]
        tokens, bounds = self._open(shard)
        for d in range(lo if offset is None else offset, hi):
            yield d, d + 1, np.asarray(tokens[bounds[d] : bounds[d + 1]], dtype=np.int64)

    def scan(self, pieces: list[int]) -> int:
        return sum(self.pieces[p][2] - self.pieces[p][1] for p in pieces)
