"""data.source=text: tokenizers, packing by document, sharding, the held-out split, resume to the token, bad input."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from text_corpus import CONFIG, write_corpus

from nanollama.data import build
from nanollama.data.batch import IGNORE
from nanollama.data.source import DataError
from nanollama.data.text import files, shards
from nanollama.data.text.__main__ import main as text_main
from nanollama.data.text.config import TextDataConfig, TextSourceConfig
from nanollama.data.text.stream import build_packer, lay_out_packed
from nanollama.data.text.tokenizers import BytesTokenizer, load_tokenizer
from nanollama.train.cli import main as train_main


def config(*paths, **kw) -> TextDataConfig:
    kw.setdefault("seq_len", 16)
    kw.setdefault("batch_size", 3)
    kw.setdefault("heldout_fraction", 0.2)
    return TextDataConfig(sources=[TextSourceConfig(path=str(p)) for p in paths], **kw)


def take(stream, n):
    return [next(stream).clone() for _ in range(n)]


# ------------------------------------------------------------------ tokenizers


def test_bytes_tokenizer_round_trips_utf8_and_ends_with_its_own_token():
    tok = load_tokenizer("bytes")
    ids = tok.encode("héllo ∑")
    assert ids.tolist() == list("héllo ∑".encode()) and (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([*ids, 256]) == "héllo ∑"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_corpus(root / "corpus", files=2, docs=60)
    out = {}
    assert (
        text_main(
            ["train-tokenizer", str(root / "corpus"), "--kind", "bpe", "--vocab", "400", "--out", str(root / "bpe")]
        )
        == 0
    )
    out["hf"] = f"hf:{root / 'bpe'}"
    try:
        import sentencepiece  # noqa: F401

        args = ["train-tokenizer", str(root / "corpus"), "--kind", "sentencepiece", "--vocab", "400"]
        assert text_main([*args, "--out", str(root / "sp")]) == 0
        out["sentencepiece"] = f"sentencepiece:{root / 'sp' / 'tokenizer.model'}"
    except ImportError:
        pass
    return root, out


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_trained_tokenizers_round_trip_and_compress(trained, kind):
    _, specs = trained
    if kind not in specs:
        pytest.skip("sentencepiece is not installed (pip install 'nanollama[text]')")
    tok = load_tokenizer(specs[kind])
    text = "the quiet theorem proves the red lemma."
    ids = tok.encode(text)
    assert tok.decode(ids).strip() == text
    assert len(ids) < len(text.encode()) / 2  # merges were learnt
    assert 0 <= tok.eos_id < tok.vocab_size and tok.eos_id not in ids.tolist()
    assert tok.identity()["sha256"]


def test_tiktoken_says_it_cannot_download_offline(monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    pytest.importorskip("tiktoken", reason="tiktoken is optional")
    with pytest.raises(DataError, match="cannot be downloaded offline"):
        load_tokenizer("tiktoken:gpt2")


def test_tiktoken_with_a_local_encoding_encodes():
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        pytest.skip("no local tiktoken encoding (TIKTOKEN_CACHE_DIR unset; nothing can be downloaded offline)")
    tok = load_tokenizer("tiktoken:gpt2")
    assert tok.decode(tok.encode("hello world")) == "hello world"


# ------------------------------------------------------------------ packing and layout


def test_packed_rows_are_the_documents_with_end_tokens_back_to_back(tmp_path):
    texts = write_corpus(tmp_path / "c", files=1, docs=30)[0]
    cfg = config(tmp_path / "c", heldout_fraction=0.0, heldout=[TextSourceConfig(path=str(tmp_path / "c"))])
    src = build(cfg)
    stream = src.train_stream(cfg.batch_size, seed=0, rank=0, world_size=1)
    rows = torch.cat(take(stream, 10)).reshape(-1).tolist()
    expected = [t for text in texts for t in [*text.encode(), 256]]
    assert rows == (expected * 3)[: len(rows)]  # one file, one piece: the file's documents in order, epoch after epoch
    assert src.vocab_size == 257 and src.token_vocab_size == 256 and src.eos == 256


def test_document_layout_restarts_positions_and_scores_the_end_token():
    eos = 9
    tokens = torch.tensor([[1, 2, eos, 3, 4, 5, eos, 6, 7]])
    b = lay_out_packed(tokens, eos)
    assert b.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert b.mask.document_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert b.targets.tolist() == [[2, eos, 3, 4, 5, eos, 6, 7]] and not (b.targets == IGNORE).any()
    visible = b.mask.dense(1, 8, 8).reshape(8, 8)
    assert not visible[3, 2] and visible[6, 3] and visible[2, 0] and not visible[7, 6]  # within a document only


# ------------------------------------------------------------------ sharding and the split


def _epoch_docs(corpus_cfg, consumer, consumers):
    src = build(corpus_cfg)
    packer = build_packer(src.corpora, src.weights, 0, consumer, consumers, src.eos, 17, src.fraction)
    cursor, docs = packer.cursors[0], []
    while cursor.epoch == 0:
        docs.append(tuple(cursor.next_doc().tolist()))
    return docs[:-1], src.corpora[0]


def test_ranks_and_workers_read_disjoint_pieces_that_cover_the_train_split(tmp_path):
    write_corpus(tmp_path / "c", files=3, docs=40)
    cfg = config(tmp_path / "c", piece_bytes=4096)  # several pieces per file: lines cut mid-file
    seen, opened = [], []
    for consumer in range(4):  # 2 ranks x 2 workers
        docs, corpus = _epoch_docs(cfg, consumer, 4)
        seen += docs
        opened.append(set(corpus._readers))
    src = build(cfg)
    everything = [
        (tuple(t.tolist()), files.heldout(c.key(p, s), 0.2))
        for c in src.corpora
        for p in range(len(c.pieces))
        for s, _, t in c.docs(p, None)
    ]
    train = sorted(t for t, held in everything if not held)
    held = [t for t, h in everything if h]
    assert sorted(seen) == train and 0 < len(held) < len(train)  # each train document once, none held out
    assert len(src.corpora[0].pieces) > 3
    heldout = src.held_out(3, 0)[0].reshape(-1).tolist()
    first = list(held[0]) + [256]
    assert heldout[: len(first)] == first[: len(heldout)]  # evaluation reads the held-out documents


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_to_the_token(tmp_path, workers):
    write_corpus(tmp_path / "a", files=2, docs=30, seed=1)
    write_corpus(tmp_path / "b", files=3, docs=3, seed=2, kind="txt")
    write_corpus(tmp_path / "z", files=2, docs=20, seed=3, kind="jsonl.gz")
    cfg = TextDataConfig(
        sources=[
            TextSourceConfig(path=str(tmp_path / "a"), weight=2.0),
            TextSourceConfig(path=str(tmp_path / "b" / "*.txt")),
            TextSourceConfig(path=str(tmp_path / "z")),
        ],
        seq_len=24,
        batch_size=2,
        num_workers=workers,
        piece_bytes=4096,
    )
    src = build(cfg)
    a = src.train_stream(2, seed=5, rank=0, world_size=1)
    take(a, 7)
    state = json.loads(json.dumps(a.state_dict()))  # plain data: it goes into the checkpoint
    rest = take(a, 9)
    a.close()
    b = build(cfg).train_stream(2, seed=5, rank=0, world_size=1)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(rest, take(b, 9)))
    b.close()


def test_another_world_size_continues_deterministically_at_the_next_epoch(tmp_path):
    write_corpus(tmp_path / "a", files=4, docs=10)
    cfg = config(tmp_path / "a")
    two = build(cfg).train_stream(3, seed=0, rank=1, world_size=2)
    take(two, 5)
    state = two.state_dict()
    streams = [build(cfg).train_stream(3, seed=0, rank=0, world_size=1) for _ in range(2)]
    notes = [s.restart_resharded(state) for s in streams]
    assert "epoch" in notes[0]
    x, y = take(streams[0], 4), take(streams[1], 4)
    assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert streams[0].base_epoch == max(c["epoch"] for s in state["states"] for c in s["cursors"]) + 1


# ------------------------------------------------------------------ prepared shards


def test_prepare_writes_checked_shards_that_train_like_the_raw_files(tmp_path):
    texts = write_corpus(tmp_path / "c", files=3, docs=20)
    out = tmp_path / "prep"
    assert text_main(["prepare", str(tmp_path / "c"), "--out", str(out), "--workers", "2"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["documents"] == 60 and m["tokenizer"]["kind"] == "bytes"
    assert m["tokens"] == sum(len(t.encode()) for f in texts for t in f)
    shards.verify(out)
    corpus = shards.PreparedCorpus(out, BytesTokenizer())
    first = next(corpus.docs(0, None))[2]
    assert first.tolist() == list(texts[0][0].encode())
    cfg = TextDataConfig(prepared=str(out), seq_len=16, batch_size=2)
    stream = build(cfg).train_stream(2, seed=0, rank=0, world_size=1)
    assert next(stream).shape == (2, 17)
    assert not list(tmp_path.glob(".prep.tmp-*"))


# ------------------------------------------------------------------ bad input


def _train(tmp_path, capsys, *overrides):
    code = train_main([str(CONFIG), f"run_dir={tmp_path / 'run'}", "steps=1", *overrides])
    err = capsys.readouterr().err.strip()
    return code, err


def _sources(path):
    return f"data.sources=[{{path: '{path}'}}]"


def test_bad_corpora_are_one_line_exit_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json\n{"body": "x"}\n')
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (_sources(tmp_path / "missing"), "missing: no such file or directory"),
        (_sources(tmp_path / "empty"), "empty source"),
        (_sources(tmp_path / "*.nothing"), "matches no files"),
        (_sources(bad), f"{bad}:3: not JSON"),
        (_sources(latin), f"{latin}: not UTF-8"),
    ]
    for override, message in cases:
        code, err = _train(tmp_path, capsys, override)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (override, err)
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    code, err = _train(tmp_path, capsys, _sources(bad))
    assert code == 2 and f"{bad}:2: no string field 'text'" in err
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written for a run that never started


def test_skipped_records_are_counted(tmp_path):
    bad = tmp_path / "c" / "bad.jsonl"
    write_corpus(tmp_path / "c", files=1, docs=40)
    with open(bad, "w") as f:
        f.write('{"text": "the cat sees the dog."}\nnot json\n{"body": 1}\n')
    src = build(config(tmp_path / "c", on_bad_record="skip"))
    src.train_stream(3, 0, 0, 1)
    assert src.corpora[0].bad == 2


def test_bad_tokenizers_and_vocabularies_are_refused(tmp_path, capsys):
    write_corpus(tmp_path / "c", files=1, docs=40)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a model")
    for spec, message in [
        ("hf:" + str(junk), f"{junk}: does not load"),
        ("sentencepiece:" + str(tmp_path / "none.model"), "no such tokenizer file"),
        ("words", "must be bytes, sentencepiece:PATH"),
        ("sentencepiece:" + str(junk), f"{junk}: does not load as a SentencePiece model"),
    ]:
        if spec.startswith("sentencepiece:") and "junk" in spec and importlib.util.find_spec("sentencepiece") is None:
            continue  # without the package the message is what to install, tested by the import test
        code, err = _train(tmp_path, capsys, _sources(tmp_path / "c"), f"data.tokenizer={spec}")
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    code, err = _train(tmp_path, capsys, _sources(tmp_path / "c"), "model.vocab_size=100")
    assert code == 2 and "model.vocab_size: is 100 but data.source=text has 256 tokens + 1 end token" in err


def test_prepare_refuses_ids_over_uint16_and_writes_nothing(tmp_path, capsys, monkeypatch):
    write_corpus(tmp_path / "c", files=1, docs=5)

    class Big(BytesTokenizer):
        vocab_size, eos_id, spec = 70000, 69999, "big"

    monkeypatch.setattr(shards, "load_tokenizer", lambda spec: Big())
    out = tmp_path / "prep"
    assert text_main(["prepare", str(tmp_path / "c"), "--out", str(out), "--dtype", "uint16"]) == 2
    assert "cannot hold token ids up to 69999" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".prep*"))
    assert text_main(["prepare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists()
    monkeypatch.undo()
    assert text_main(["prepare", str(tmp_path / "c"), "--out", str(out)]) == 0
    code = train_main(
        [str(CONFIG), f"run_dir={tmp_path / 'run'}", f"data.prepared={out}", "data.sources=[]", "data.tokenizer=hf:x"]
    )
    assert code == 2


def test_tokenizer_identity_is_checked_against_a_prepared_directory(tmp_path, trained):
    root, specs = trained
    write_corpus(tmp_path / "c", files=1, docs=10)
    out = tmp_path / "prep"
    assert text_main(["prepare", str(tmp_path / "c"), "--out", str(out), "--tokenizer", specs["hf"]]) == 0
    with pytest.raises(DataError, match="prepared with tokenizer hf:"):
        build(TextDataConfig(prepared=str(out), tokenizer="bytes"))
    src = build(TextDataConfig(prepared=str(out), tokenizer=specs["hf"], seq_len=8, batch_size=2))
    vocab = load_tokenizer(specs["hf"]).vocab_size
    assert src.vocab_size == vocab and int(next(src.train_stream(2, 0, 0, 1)).max()) < vocab


def test_the_stdlib_prefix_resolves_to_this_pythons_library():
    base, found = files.resolve("stdlib:json/*.py")
    assert (base / "__init__.py").exists() and Path(files.expand("stdlib:")).name.startswith("python")
    assert any(f.name == "decoder.py" for f in found)


def test_a_missing_optional_package_says_what_to_install(tmp_path, monkeypatch):
    model = tmp_path / "t.model"
    model.write_bytes(b"x")
    for module, spec in (("sentencepiece", f"sentencepiece:{model}"), ("tokenizers", f"hf:{model}")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(DataError, match=rf"needs the {module} package: pip install 'nanollama\[text\]'"):
            load_tokenizer(spec)
