"""A small English-like corpus from a seeded grammar, written as .jsonl, .jsonl.gz and .txt files (no downloads)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

NOUNS = "cat dog river engine theorem proof garden teacher market signal lemma kernel".split()
VERBS = "sees follows proves builds crosses finds opens mends".split()
ADJS = "small quiet red formal hidden early bright".split()
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "text" / "tiny.yaml"


def sentence(rng: np.random.Generator) -> str:
    def phrase():
        adj = f"{rng.choice(ADJS)} " if rng.random() < 0.5 else ""
        return f"the {adj}{rng.choice(NOUNS)}"

    return f"{phrase()} {rng.choice(VERBS)} {phrase()}."


def document(rng: np.random.Generator, sentences: tuple[int, int] = (1, 6)) -> str:
    return " ".join(sentence(rng) for _ in range(int(rng.integers(*sentences))))


def write_corpus(root: Path, files: int = 4, docs: int = 40, seed: int = 0, kind: str = "jsonl") -> list[list[str]]:
    """`files` files of `docs` documents each (one document per .txt file); returns the texts per file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(files):
        if kind == "txt":
            texts = [document(rng, (5, 30))]
            (root / f"doc{i:03d}.txt").write_text(texts[0])
        else:
            texts = [document(rng) for _ in range(docs)]
            lines = "".join(json.dumps({"text": t, "id": j}) + "\n" for j, t in enumerate(texts))
            if kind == "jsonl":
                (root / f"part{i:03d}.jsonl").write_text(lines)
            else:
                with gzip.open(root / f"part{i:03d}.jsonl.gz", "wt") as f:
                    f.write(lines)
        out.append(texts)
    return out


def tiny_text(sources: str, **changes) -> list[str]:
    """Overrides of configs/text/tiny.yaml for a seconds-long CPU run on `sources` (a YAML list)."""
    base = {
        "data.sources": sources,
        "model.dim": 32,
        "model.n_layers": 1,
        "model.max_seq_len": 32,
        "data.batch_size": 4,
        "data.seq_len": 32,
        "data.heldout_fraction": 0.2,
        "optim.warmup": 2,
        "log.every": 1,
        "eval.every": 0,
        "eval.batches": 1,
    }
    return [f"{k}={v}" for k, v in {**base, **changes}.items()]
