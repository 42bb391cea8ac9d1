"""Tokenizers behind one small interface, named by `data.tokenizer`.

- `bytes`: the UTF-8 bytes (ids 0..255) plus one special, the end token 256. No dependency.
- `sentencepiece:PATH`: a SentencePiece model file (pip install sentencepiece).
- `hf:PATH`: a Hugging Face `tokenizers` tokenizer.json, or a directory holding one (pip install tokenizers).
- `tiktoken:NAME`: a tiktoken encoding whose file is already in the local cache (TIKTOKEN_CACHE_DIR);
  nothing can be downloaded offline.

Every tokenizer has an end token (`eos_id`): its own where it defines one, else one more id after
its vocabulary. `vocab_size` counts it.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from nanollama.data.source import DataError

END_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "[EOS]")
INSTALL = "pip install 'nanollama[text]'"


class Tokenizer(ABC):
    """Text -> token ids; `spec` is the `data.tokenizer` string it was loaded from."""

    kind = ""
    spec = ""
    path: Path | None = None
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """The ids of `text` (int64), without the end token."""

    @abstractmethod
    def decode(self, ids) -> str: ...

    def identity(self) -> dict:
        """What a prepared shard records to refuse another tokenizer: kind, vocabulary, end token, file checksum."""
        out = {"spec": self.spec, "kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        if self.path is not None:
            out["sha256"] = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return out


class BytesTokenizer(Tokenizer):
    kind = "bytes"
    spec = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        sp = _need("sentencepiece", "sentencepiece")
        try:
            self.sp = sp.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: does not load as a SentencePiece model ({_first_line(e)})") from None
        self.path, self.spec = path, f"sentencepiece:{path}"
        n = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        self.eos_id, self.vocab_size = (eos, n) if eos >= 0 else (n, n + 1)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) != self.eos_id])


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: Path):
        tk = _need("tokenizers", "hf")
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: no such tokenizer file (hf:PATH wants a tokenizer.json or its directory)")
        try:
            self.tok = tk.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions for a malformed file
            raise DataError(f"{path}: does not load as a tokenizers tokenizer.json ({_first_line(e)})") from None
        self.path, self.spec = path, f"hf:{path}"
        n = self.tok.get_vocab_size(with_added_tokens=True)
        eos = next((self.tok.token_to_id(t) for t in END_NAMES if self.tok.token_to_id(t) is not None), None)
        self.eos_id, self.vocab_size = (eos, n) if eos is not None else (n, n + 1)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id])


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, name: str):
        tiktoken = _need("tiktoken", "tiktoken")
        # tiktoken downloads an encoding's file on first use; offline only a cached copy can work, and a
        # failed download can be slow, so without a cache directory we refuse before trying.
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        if not cache or not Path(cache).is_dir():
            raise DataError(
                f"tiktoken:{name}: needs its encoding file in a local cache (set TIKTOKEN_CACHE_DIR to a directory "
                "holding it); it cannot be downloaded offline"
            )
        try:
            self.enc = tiktoken.get_encoding(name)
        except Exception as e:
            raise DataError(
                f"tiktoken:{name}: not available in {cache} ({_first_line(e)}); it cannot be downloaded offline"
            ) from None
        self.spec = f"tiktoken:{name}"
        n = self.enc.n_vocab
        eos = self.enc.eot_token if self.enc.eot_token is not None else None
        self.eos_id, self.vocab_size = (eos, n) if eos is not None else (n, n + 1)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids if int(i) != self.eos_id])


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer `spec` names (see the module docstring); a DataError naming the file if it does not load."""
    kind, _, arg = spec.partition(":")
    if kind == "bytes" and not arg:
        return BytesTokenizer()
    if kind in ("sentencepiece", "hf") and arg:
        path = Path(arg).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such tokenizer file (data.tokenizer={spec})")
        return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer(arg)
    raise DataError(f"data.tokenizer={spec!r}: must be bytes, sentencepiece:PATH, hf:PATH or tiktoken:NAME")


def _need(module: str, kind: str):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"data.tokenizer={kind}:... needs the {module} package: {INSTALL}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
