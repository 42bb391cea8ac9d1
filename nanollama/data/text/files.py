"""Raw corpora on disk: resolving a source's path to files, cutting them into pieces, reading documents.

A piece is the unit a rank or DataLoader worker owns: a whole .txt or .jsonl.gz file, or a byte
range of a plain .jsonl (a line belongs to the piece its first byte is in), so one big file still
feeds many readers and none of them reads the others' bytes. A document's place, (file, byte
offset), names it: the held-out split hashes it, and a resume state points at it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nanollama.data.source import DataError

STDLIB = "stdlib:"
SUFFIXES = (".jsonl", ".jsonl.gz", ".txt")


def expand(path: str) -> str:
    """`stdlib:REST` -> REST under this Python's standard library directory; other paths unchanged."""
    if path.startswith(STDLIB):
        return str(Path(sysconfig.get_paths()["stdlib"]) / (path[len(STDLIB) :] or "."))
    return str(Path(path).expanduser())


def resolve(path: str) -> tuple[Path, list[Path]]:
    """(base directory, sorted files) of a source path (file, directory or glob); DataError if none or all empty."""
    full = expand(path)
    p = Path(full)
    if any(c in full for c in "*?["):
        parts = p.parts
        first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        base = Path(*parts[:first])
        files = sorted(f for f in base.glob(str(Path(*parts[first:]))) if f.is_file())
        if not files:
            raise DataError(f"{path}: matches no files")
    elif p.is_dir():
        base = p
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        if not files:
            raise DataError(f"{path}: a directory without .jsonl, .jsonl.gz or .txt files")
    elif p.is_file():
        base, files = p.parent, [p]
    else:
        raise DataError(f"{path}: no such file or directory")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"{path}: empty source ({len(files)} file{'s' * (len(files) > 1)}, no bytes)")
    return base, files


def kind(path: Path) -> str:
    if path.name.endswith(".jsonl"):
        return "jsonl"
    if path.name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    return "text"  # .txt, .py, ...: the whole file is one document


@dataclass(frozen=True)
class Piece:
    file: int  # index into the source's files
    lo: int  # byte range [lo, hi) (decompressed bytes for .gz: the whole file)
    hi: int


def pieces(files: list[Path], piece_bytes: int) -> list[Piece]:
    out = []
    for i, f in enumerate(files):
        size = f.stat().st_size
        if size == 0:
            continue
        if kind(f) == "jsonl":
            out += [Piece(i, lo, min(lo + piece_bytes, size)) for lo in range(0, size, piece_bytes)]
        else:
            out.append(Piece(i, 0, 1 << 62))  # to the end (a .gz file's decompressed size is not known)
    return out


def heldout(key: str, fraction: float) -> bool:
    """Whether the document at `key` ("relative/path:offset") is held out: a hash, the same on every machine."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def line_of(path: Path, offset: int) -> int:
    """The 1-based line number of byte `offset` (read only to report an error)."""
    opener = gzip.open if kind(path) == "jsonl.gz" else open
    with opener(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


class PieceReader:
    """Documents of one piece from a byte offset on: yields (start, next offset, text or None for a skipped record)."""

    def __init__(self, path: Path, text_field: str, on_bad_record: str):
        self.path, self.text_field, self.on_bad = path, text_field, on_bad_record
        self.kind = kind(path)
        self.bad = 0  # records skipped (on_bad_record=skip)

    def docs(self, piece: Piece, offset: int | None) -> Iterator[tuple[int, int, str | None]]:
        if self.kind == "text":
            if offset is not None and offset > 0:
                return  # the piece's one document was read
            raw = self.path.read_bytes()
            yield 0, max(len(raw), 1), self._decode(raw, 0)
            return
        opener = gzip.open if self.kind == "jsonl.gz" else open
        with opener(self.path, "rb") as f:
            if offset is None:
                offset = piece.lo
                if offset > 0:  # align to the first line that starts inside the piece
                    f.seek(offset - 1)
                    f.readline()
                    offset = f.tell()
            f.seek(offset)
            while offset < piece.hi:
                line = f.readline()
                if not line:
                    return
                start, offset = offset, offset + len(line)
                if line.strip():
                    yield start, offset, self._record(line, start)

    def _decode(self, raw: bytes, start: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"{self.path}:{line_of(self.path, start)}" if self.kind != "text" else str(self.path)
            raise DataError(f"{where}: not UTF-8 (byte {start + e.start}); convert the file to UTF-8") from None

    def _record(self, line: bytes, start: int) -> str | None:
        text = self._decode(line, start)
        try:
            record = json.loads(text)
            problem = None
        except json.JSONDecodeError as e:
            record, problem = None, f"not JSON ({e.msg})"
        if problem is None and not (isinstance(record, dict) and isinstance(record.get(self.text_field), str)):
            problem = f"no string field '{self.text_field}'"
        if problem is None:
            return record[self.text_field]
        if self.on_bad == "skip":
            self.bad += 1
            return None
        raise DataError(
            f"{self.path}:{line_of(self.path, start)}: {problem} (data.on_bad_record=skip skips such lines)"
        )
