"""Reading token files written by `python -m nanollama.data.gssm`: the manifest, checked, and a map-style dataset.

A data directory holds manifest.json and, per split, `<split>_tokens.npy` (N, seq_len + 1) and
optionally `<split>_hidden.npy` (N, seq_len + 1, n_hidden): standard .npy files, memory-mapped on
read. The manifest is written last and the directory renamed into place, so a directory with a
manifest is complete; `load_manifest` still checks every file against it (present, shape, dtype,
size, token ids within the vocabulary) so a damaged or mixed-up directory fails with a line naming
the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nanollama.data.source import DataError

FORMAT = "nanollama.gssm.tokens/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
_REQUIRED = ("format", "vocab_size", "seq_len", "seed", "graph_seed", "gssm", "splits")
_ARRAY_FIELDS = ("file", "shape", "dtype")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every token id (int32 beyond 16 bits)."""
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _field(obj: dict, dotted: str) -> Any:
    node: Any = obj
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise DataError(f"{MANIFEST}: missing field '{dotted}'")
        node = node[key]
    return node


def check_array(root: Path, spec: dict, where: str) -> None:
    """Check one .npy file against its manifest entry {file, shape, dtype}: present, same header, full size."""
    for key in _ARRAY_FIELDS:
        if not isinstance(spec, dict) or key not in spec:
            raise DataError(f"{MANIFEST}: missing field '{where}.{key}'")
    path = root / spec["file"]
    if not path.is_file():
        raise DataError(f"{path}: missing (listed in {MANIFEST} as {where})")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None
    want_shape, want_dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    if shape != want_shape:
        raise DataError(f"{path}: shape {shape}, but {MANIFEST} says {want_shape}")
    if dtype != want_dtype:
        raise DataError(f"{path}: dtype {dtype}, but {MANIFEST} says {want_dtype}")
    if fortran:
        raise DataError(f"{path}: Fortran order; expected a C-ordered array")
    size, want = os.path.getsize(path), offset + int(np.prod(shape)) * dtype.itemsize
    if size != want:
        raise DataError(f"{path}: {size} bytes, expected {want} for shape {shape} {dtype} (truncated or padded)")


def token_range(path: Path, chunk_rows: int = 1 << 16) -> tuple[int, int]:
    """(smallest, largest) token id in a tokens .npy file, read through a memory map in chunks."""
    array = np.load(path, mmap_mode="r")
    if array.size == 0:
        return 0, 0
    lo, hi = None, None
    for start in range(0, len(array), chunk_rows):
        block = np.asarray(array[start : start + chunk_rows])
        low, high = int(block.min()), int(block.max())
        lo, hi = (low, high) if lo is None else (min(lo, low), max(hi, high))
    return lo, hi


def check_token_range(root: Path, spec: dict, vocab_size: int, where: str) -> None:
    """Refuse token ids outside [0, vocab_size): they would crash the embedding mid-training.

    The writer records each split's min and max in the manifest, so the check costs nothing; for a
    manifest without them (written before they were recorded) the file is scanned once here.
    """
    lo, hi = spec.get("min"), spec.get("max")
    how = f"{MANIFEST}'s {where}.min/max"
    if lo is None or hi is None:
        lo, hi = token_range(root / spec["file"])
        how = "a scan of the file"
    if not (0 <= lo and hi < vocab_size):
        raise DataError(
            f"{root / spec['file']}: token ids {lo}..{hi} (from {how}) fall outside the vocabulary "
            f"[0, {vocab_size}) of {MANIFEST}"
        )


def load_manifest(path: str | Path) -> dict:
    """The manifest of data directory `path`, after checking it and every file it lists."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory")
    file = root / MANIFEST
    if not file.is_file():
        raise DataError(f"{file}: missing (not a data directory, or its writing did not finish)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{file}: expected a JSON object")
    for key in _REQUIRED:
        _field(manifest, key)
    if manifest["format"] != FORMAT:
        raise DataError(f"{file}: format {manifest['format']!r}, this version reads {FORMAT!r}")
    for split in SPLITS:
        n = _field(manifest, f"splits.{split}.n")
        tokens = _field(manifest, f"splits.{split}.tokens")
        check_array(root, tokens, f"splits.{split}.tokens")
        if tuple(tokens["shape"]) != (n, manifest["seq_len"] + 1):
            raise DataError(f"{file}: splits.{split}.tokens.shape {tokens['shape']} != [n, seq_len + 1]")
        if np.dtype(tokens["dtype"]) != token_dtype(manifest["vocab_size"]):
            raise DataError(f"{file}: splits.{split}.tokens.dtype does not fit vocab_size {manifest['vocab_size']}")
        check_token_range(root, tokens, manifest["vocab_size"], f"splits.{split}.tokens")
        hidden = manifest["splits"][split].get("hidden")
        if hidden is not None:
            check_array(root, hidden, f"splits.{split}.hidden")
            if tuple(hidden["shape"][:2]) != tuple(tokens["shape"]):
                raise DataError(f"{file}: splits.{split}.hidden.shape {hidden['shape']} does not match the tokens'")
    return manifest


class TokenFileDataset(Dataset):
    """Map-style dataset over one split's token file: item i is row i, a LongTensor (seq_len + 1,).

    The file is memory-mapped lazily in each process that reads it (DataLoader workers included),
    never pickled. `__getitems__` reads a whole batch in one go (a DataLoader with a batch sampler
    uses it; pair it with `collate_fn=as_batch`). `length` crops rows to their first `length` tokens
    (a GSSM sequence's prefix is itself a GSSM sequence); `hidden=True` also returns hidden states.
    """

    def __init__(self, path: str | Path, split: str = "train", length: int | None = None, hidden: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.root, self.split = Path(path), split
        self.manifest = load_manifest(self.root)
        info = self.manifest["splits"][split]
        self.n, self.row = info["n"], self.manifest["seq_len"] + 1
        self.length = self.row if length is None else length
        if not 1 <= self.length <= self.row:
            raise DataError(f"{self.root}: rows hold {self.row} tokens; cannot read {length} per sequence")
        if hidden and info.get("hidden") is None:
            raise DataError(f"{self.root}: the {split} split was written without hidden states (--hidden)")
        self.hidden = hidden
        self._tokens: np.ndarray | None = None
        self._hidden: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_hidden": None}  # workers map the file themselves

    def _open(self) -> None:
        info = self.manifest["splits"][self.split]
        self._tokens = np.load(self.root / info["tokens"]["file"], mmap_mode="r")
        if self.hidden:
            self._hidden = np.load(self.root / info["hidden"]["file"], mmap_mode="r")

    def __len__(self) -> int:
        return self.n

    def _rows(self, array: np.ndarray, index: np.ndarray) -> torch.Tensor:
        # memmap fancy indexing reads the rows; sorted indices read the file front to back
        order = np.argsort(index, kind="stable")
        rows = np.empty((len(index), self.length) + array.shape[2:], dtype=np.int64)
        rows[order] = array[index[order], : self.length]
        return torch.from_numpy(rows)

    def __getitems__(self, indices: list[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Rows `indices` as one LongTensor (len(indices), length) [and hidden (len, length, n_hidden)]."""
        if self._tokens is None:
            self._open()
        index = np.asarray(indices, dtype=np.int64)
        if index.size and (index.min() < -self.n or index.max() >= self.n):
            raise IndexError(f"index out of range for {self.n} sequences")
        index %= self.n
        tokens = self._rows(self._tokens, index)
        return (tokens, self._rows(self._hidden, index)) if self.hidden else tokens

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.__getitems__([i])
        return (out[0][0], out[1][0]) if self.hidden else out[0]


def as_batch(batch: Any) -> Any:
    """DataLoader collate_fn for `TokenFileDataset.__getitems__`: the batch is already stacked."""
    return batch
