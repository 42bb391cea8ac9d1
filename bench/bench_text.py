"""Text data throughput: tokenization per tokenizer, and the loader against what training consumes.

Run: `pytest bench/bench_text.py --benchmark-only`. The corpus is this Python's standard library
(`stdlib:*.py`, the first CORPUS_BYTES of it), so nothing is downloaded.

- group text-tokenize: tokens/s of one process (= one DataLoader worker) per tokenizer: bytes, hf (a
  byte-level BPE of 1024 ids trained here), sentencepiece (trained here), tiktoken (only with a
  local encoding: TIKTOKEN_CACHE_DIR; it cannot download offline).
- group text-loader: batches/s of the rank's stream at configs/text/tiny.yaml's shape, from prepared
  shards (memory-mapped) and from raw files (tokenized in the loader: bytes, and the hf BPE), as tokens/s; extra_info
  `lead` = loader tokens/s / the trainer's tokens/s on the same config (measured here over a few
  optimizer steps): how far the loader is ahead of what training eats (must stay > 1).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nanollama import config
from nanollama.data.text import files
from nanollama.data.text.__main__ import main as text_main
from nanollama.data.text.tokenizers import DataError, load_tokenizer
from nanollama.train.config import TrainConfig
from nanollama.train.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "text" / "tiny.yaml"
CORPUS_BYTES = 1_000_000
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("text-corpus")
    texts, total = [], 0
    for f in files.resolve("stdlib:*.py")[1]:
        text = f.read_text(encoding="utf-8", errors="replace")
        (root / f"{f.stem}.txt").write_text(text)
        texts.append(text)
        total += len(text)
        if total >= CORPUS_BYTES:
            break
    return root, texts


@pytest.fixture(scope="module")
def tokenizers(corpus, tmp_path_factory) -> dict[str, str]:
    root, out = tmp_path_factory.mktemp("text-tok"), {"bytes": "bytes"}
    if (
        text_main(["train-tokenizer", str(corpus[0]), "--kind", "bpe", "--vocab", "1024", "--out", str(root / "bpe")])
        == 0
    ):
        out["hf"] = f"hf:{root / 'bpe'}"
    sp = ["train-tokenizer", str(corpus[0]), "--kind", "sentencepiece", "--vocab", "1024", "--out", str(root / "sp")]
    if text_main(sp) == 0:
        out["sentencepiece"] = f"sentencepiece:{root / 'sp' / 'tokenizer.model'}"
    out["tiktoken"] = "tiktoken:gpt2"
    return out


@pytest.mark.parametrize("kind", ["bytes", "hf", "sentencepiece", "tiktoken"])
def test_tokenize(benchmark, corpus, tokenizers, kind):
    if kind not in tokenizers:
        pytest.skip(f"the {kind} tokenizer could not be trained here")
    try:
        tok = load_tokenizer(tokenizers[kind])
    except DataError as e:
        pytest.skip(str(e))
    texts = corpus[1]
    benchmark.group = "text-tokenize"
    counts = benchmark.pedantic(lambda: sum(len(tok.encode(t)) for t in texts), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        tokens_per_s_per_worker=round(counts / benchmark.stats.stats.mean),
        bytes_per_s_per_worker=round(sum(len(t.encode()) for t in texts) / benchmark.stats.stats.mean),
        tokens=counts,
        vocab_size=tok.vocab_size,
        threads=THREADS,
        device="cpu",
    )


def _config(tmp: Path, *overrides: str) -> TrainConfig:
    return config.load(TrainConfig, str(CONFIG), [f"run_dir={tmp / 'run'}", *overrides])


@pytest.fixture(scope="module")
def trainer_tokens_per_s(corpus, tmp_path_factory) -> float:
    """What training consumes at tiny.yaml's shape: tokens/s over a few timed optimizer steps."""
    tmp = tmp_path_factory.mktemp("text-train")
    trainer = Trainer(_config(tmp, f"data.sources=[{{path: '{corpus[0]}'}}]"))
    try:
        trainer.model.train()
        trainer.train_step()  # warm-up: attention backend choice, allocator
        start, steps = time.perf_counter(), 5
        for _ in range(steps):
            trainer.train_step()
        d = trainer.cfg.data
        return steps * d.batch_size * d.seq_len / (time.perf_counter() - start)
    finally:
        trainer.stream.close()
        trainer.dist.close()
        trainer.lock.release()


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text-prep") / "prep"
    assert text_main(["prepare", str(corpus[0]), "--out", str(out), "--workers", "1", "--progress-every", "1e9"]) == 0
    return out


@pytest.mark.parametrize("mode", ["prepared", "raw", "raw-hf"])
def test_loader(benchmark, corpus, prepared, tokenizers, trainer_tokens_per_s, tmp_path, mode):
    from nanollama.data import build

    data = [f"data.prepared={prepared}", "data.sources=[]"] if mode == "prepared" else []
    if mode == "raw-hf":  # the slow case: a real tokenizer run in the loader
        if "hf" not in tokenizers:
            pytest.skip("the hf tokenizer could not be trained here")
        data = [f"data.tokenizer={tokenizers['hf']}"]
    cfg = _config(tmp_path, f"data.sources=[{{path: '{corpus[0]}'}}]", *data)
    d = cfg.data
    stream = build(d).train_stream(d.batch_size, seed=0, rank=0, world_size=1)
    next(stream)
    benchmark.group = "text-loader"
    n = 20
    benchmark.pedantic(lambda: [next(stream) for _ in range(n)], rounds=3, warmup_rounds=1)
    tokens_per_s = n * d.batch_size * d.seq_len / benchmark.stats.stats.mean
    benchmark.extra_info.update(
        tokens_per_s=round(tokens_per_s),
        trainer_tokens_per_s=round(trainer_tokens_per_s),
        lead=round(tokens_per_s / trainer_tokens_per_s, 1),
        batch_size=d.batch_size,
        seq_len=d.seq_len,
        num_workers=d.num_workers,
        threads=THREADS,
        device="cpu",
    )
    stream.close()
