"""Train a tokenizer on local corpora: SentencePiece (a .model file) or a byte-level BPE (a tokenizer.json).

Both end documents with their own end token (`</s>` for SentencePiece, `<|endoftext|>` for BPE),
which `data.tokenizer` then uses. The output directory appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from nanollama.data.source import DataError
from nanollama.data.text import files
from nanollama.data.text.tokenizers import INSTALL


def iter_texts(sources: list[str], text_field: str = "text", on_bad_record: str = "fail") -> Iterator[str]:
    """Every document's text of `sources` (paths, directories, globs), file by file."""
    for source in sources:
        for f in files.resolve(source)[1]:
            reader = files.PieceReader(f, text_field, on_bad_record)
            yield from (text for _, _, text in reader.docs(files.Piece(0, 0, 1 << 62), None) if text)


def train_tokenizer(
    sources: list[str], kind: str, vocab: int, out: str | Path, text_field: str = "text", force: bool = False
) -> str:
    """Train a `kind` (sentencepiece | bpe) tokenizer of `vocab` ids into `out`; returns its data.tokenizer spec."""
    out = Path(out)
    if kind not in ("sentencepiece", "bpe"):
        raise DataError(f"--kind {kind}: must be sentencepiece or bpe")
    if vocab < 16:
        raise DataError(f"--vocab {vocab}: must be >= 16")
    if out.exists() and not force:
        raise DataError(f"{out}: exists (use --force to replace it)")
    for s in sources:
        files.resolve(s)  # a missing or empty source fails before anything is written
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        name = (_sentencepiece if kind == "sentencepiece" else _bpe)(iter_texts(sources, text_field), vocab, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"{'sentencepiece' if kind == 'sentencepiece' else 'hf'}:{out / name}"


def _sentencepiece(texts: Iterator[str], vocab: int, tmp: Path) -> str:
    try:
        import sentencepiece as spm
    except ImportError:
        raise DataError(f"--kind sentencepiece needs the sentencepiece package: {INSTALL}") from None
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(t for text in texts for t in text.splitlines() if t.strip()),
            model_prefix=str(tmp / "tokenizer"),
            vocab_size=vocab,
            model_type="bpe",
            byte_fallback=True,  # any text encodes, unseen characters as bytes
            character_coverage=1.0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed: {str(e).strip().splitlines()[-1]}") from None
    return "tokenizer.model"


def _bpe(texts: Iterator[str], vocab: int, tmp: Path) -> str:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError(f"--kind bpe needs the tokenizers package: {INSTALL}") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has an id: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(tmp / "tokenizer.json"))
    return "tokenizer.json"
