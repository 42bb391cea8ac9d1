"""Token files: writing (atomic, no overwrite, progress, CLI), manifest checks, the map-style dataset,
the shuffling/sharding sampler and the resumable file stream."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from nanollama.data import seeds
from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig, files
from nanollama.data.gssm.__main__ import main
from nanollama.data.gssm.files import write_dataset
from nanollama.data.gssm.reader import DataError, TokenFileDataset, as_batch, load_manifest, token_dtype
from nanollama.data.gssm.stream import FileStream, build_train_stream
from nanollama.data.sampler import ShardedShuffleSampler

T = 20  # seq_len: rows hold T + 1 tokens
N_TRAIN, N_TEST, CHUNK = 150, 40, 64  # 3 train chunks, the last one short


def make_gssm(seed=3):
    cfg = GSSMConfig(
        nodes=[
            NodeConfig("a", state_dim=5, alpha=1.0),
            NodeConfig("b", state_dim=3, alpha=1.0, parents=["a"]),
            NodeConfig("x", state_dim=11, alpha=1.0, parents=["a", "b"], observed=True),
        ]
    )
    return GSSM(cfg, seed=seed)


@pytest.fixture(scope="module")
def gssm():
    return make_gssm()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, gssm):
    out = tmp_path_factory.mktemp("data") / "gssm"
    mp = pytest.MonkeyPatch()
    mp.setattr(files, "CHUNK", CHUNK)
    try:
        write_dataset(out, gssm, T, N_TRAIN, N_TEST, seed=7, hidden=True, progress_every=1e9)
    finally:
        mp.undo()
    return out


def copy_of(data_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(data_dir, dst)
    return dst


# ----------------------------------------------------------------------------- writing


def test_round_trip_tokens_hidden_and_manifest(data_dir, gssm):
    m = load_manifest(data_dir)
    assert m["vocab_size"] == 11 and m["seq_len"] == T and m["chunk"] == CHUNK and m["seed"] == 7
    assert m["hidden_names"] == ["a", "b"]
    train = np.load(data_dir / "train_tokens.npy", mmap_mode="r")
    assert isinstance(train, np.memmap) and train.shape == (N_TRAIN, T + 1) and train.dtype == np.uint8
    for split, tag, n in (("train", seeds.FILE_TRAIN, N_TRAIN), ("test", seeds.FILE_TEST, N_TEST)):
        ds = TokenFileDataset(data_dir, split, hidden=True)
        assert len(ds) == n
        tokens, hidden = ds.__getitems__(list(range(n)))
        for c, lo in enumerate(range(0, n, CHUNK)):  # each chunk is one sample() call with its derived seed
            want, want_h = gssm.sample(CHUNK, T + 1, seed=seeds.derive_seed(7, tag, c), return_hidden=True)
            b = min(CHUNK, n - lo)
            assert torch.equal(tokens[lo : lo + b], want[:b])
            assert torch.equal(hidden[lo : lo + b], want_h[:b])
    test_tokens = TokenFileDataset(data_dir, "test").__getitems__(list(range(N_TEST)))
    nll = torch.cat(
        [
            gssm.nll(test_tokens[lo : lo + CHUNK], seed=seeds.derive_seed(7, seeds.FILE_TEST, c))[:, 1:]
            for c, lo in enumerate(range(0, N_TEST, CHUNK))
        ]
    )
    assert m["test_bayes_nll"] == pytest.approx(nll.double().mean().item(), rel=1e-9)
    assert 0 < m["test_bayes_nll"] < np.log(11)


def test_train_and_test_splits_are_disjoint(data_dir):
    train = {tuple(r) for r in np.load(data_dir / "train_tokens.npy").tolist()}
    test = {tuple(r) for r in np.load(data_dir / "test_tokens.npy").tolist()}
    assert len(train) == N_TRAIN and len(test) == N_TEST and not (train & test)


def test_token_dtype_by_vocab_size():
    assert token_dtype(256) == np.uint8 and token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_refuses_to_overwrite_without_force(tmp_path, gssm):
    out = tmp_path / "d"
    write_dataset(out, gssm, 8, 10, 5, seed=0, progress_every=1e9)
    before = np.load(out / "train_tokens.npy")
    with pytest.raises(DataError, match="already exists; pass --force"):
        write_dataset(out, gssm, 8, 10, 5, seed=1, progress_every=1e9)
    assert np.array_equal(np.load(out / "train_tokens.npy"), before)
    write_dataset(out, gssm, 8, 12, 5, seed=1, force=True, progress_every=1e9)
    assert load_manifest(out)["splits"]["train"]["n"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or old directory left
    (tmp_path / "empty").mkdir()  # an empty directory is not data: no --force needed
    write_dataset(tmp_path / "empty", gssm, 8, 3, 3, seed=0, progress_every=1e9)


class FailingGSSM:
    """Delegates to a real GSSM but fails on the n-th sample() call: a crash in the middle of writing."""

    def __init__(self, gssm, fail_at):
        self.gssm, self.calls, self.fail_at = gssm, 0, fail_at

    def __getattr__(self, name):
        return getattr(self.gssm, name)

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.gssm.sample(*args, **kwargs)


def test_a_failed_write_leaves_nothing_half_written(tmp_path, gssm, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 4)
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, FailingGSSM(gssm, fail_at=3), 8, 10, 5, seed=0, progress_every=1e9)
    assert list(tmp_path.iterdir()) == []
    write_dataset(out, gssm, 8, 10, 5, seed=0, progress_every=1e9)
    good = np.load(out / "train_tokens.npy")
    with pytest.raises(KeyboardInterrupt):  # a failed --force keeps the previous data intact
        write_dataset(out, FailingGSSM(gssm, fail_at=4), 8, 10, 5, seed=5, force=True, progress_every=1e9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert np.array_equal(np.load(out / "train_tokens.npy"), good)
    load_manifest(out)


def test_a_directory_without_manifest_is_not_data(tmp_path, data_dir):
    d = copy_of(data_dir, tmp_path)
    (d / "manifest.json").unlink()  # what an interrupted writer would look like if it wrote in place
    with pytest.raises(DataError, match="manifest.json: missing"):
        TokenFileDataset(d)


def test_progress_lines(tmp_path, gssm, monkeypatch):
    monkeypatch.setattr(files, "CHUNK", 8)
    err = io.StringIO()
    write_dataset(tmp_path / "d", gssm, 8, 20, 10, seed=0, progress_every=0, stream=err)
    lines = err.getvalue().splitlines()
    assert len(lines) == 5  # one per chunk: 3 train, 2 test
    assert lines[0].startswith("train: 8/20 sequences") and "tokens/s" in lines[0] and "eta" in lines[0]
    assert lines[-1].startswith("test: 10/10 sequences") and "100.0%" in lines[-1]


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def config_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "seed: 4\n"
        "model: {dim: 16, n_layers: 1, n_heads: 2}\n"
        "data:\n  seq_len: 12\n  graph_seed: 2\n"
        "  gssm:\n    nodes:\n"
        "      - {name: h, state_dim: 4, alpha: 0.5}\n"
        "      - {name: x, state_dim: 7, alpha: 0.5, parents: [h], observed: true}\n"
    )
    return path


def test_cli_writes_with_overrides_and_fails_in_one_line(tmp_path, config_yaml, capsys):
    out = tmp_path / "out"
    assert main([str(config_yaml), "--out", str(out), "--train", "9", "--test", "5", "data.seq_len=6"]) == 0
    m = load_manifest(out)
    assert m["seq_len"] == 6 and m["seed"] == 4 and m["graph_seed"] == 2 and m["vocab_size"] == 7
    assert m["config"]["data"]["seq_len"] == 6 and m["splits"]["train"].get("hidden") is None
    assert "wrote" in capsys.readouterr().err
    for argv, match in (
        ([str(config_yaml), "--out", str(out), "--train", "9", "--test", "5"], "already exists"),
        ([str(config_yaml), "--out", str(tmp_path / "o2"), "--train", "9", "--test", "5", "data.seqlen=3"], "seqlen"),
        ([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o3"), "--train", "9", "--test", "5"], "not found"),
        ([str(config_yaml), "--out", str(tmp_path / "o4"), "--train", "0", "--test", "5"], "--train"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and match in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        main([str(config_yaml), "--train", "9", "--test", "5"])  # --out missing
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path, config_yaml):
    """One real `python -m nanollama.data.gssm` (a fresh interpreter costs seconds; errors are tested above)."""
    src = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nanollama.data.gssm", str(config_yaml), "--out", str(out), "--train", "4"]
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd + ["--test", "3", "--hidden"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert load_manifest(out)["splits"]["test"]["hidden"]["shape"] == [3, 13, 1]


# ----------------------------------------------------------------------------- manifest checks


def _edit_manifest(d, edit):
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: (d / "test_tokens.npy").unlink(), r"test_tokens.npy: missing \(listed in manifest.json"),
        (lambda d: _edit_manifest(d, lambda m: m.pop("vocab_size")), "missing field 'vocab_size'"),
        (lambda d: _edit_manifest(d, lambda m: m["splits"]["train"].pop("n")), "missing field 'splits.train.n'"),
        (
            lambda d: _edit_manifest(d, lambda m: m["splits"]["test"]["tokens"].pop("dtype")),
            "'splits.test.tokens.dtype'",
        ),
        (lambda d: _edit_manifest(d, lambda m: m.update(format="other/9")), "format 'other/9'"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda d: np.save(d / "train_tokens.npy", np.zeros((N_TRAIN, T + 1), np.uint16)), "dtype uint16, but"),
        (lambda d: np.save(d / "train_tokens.npy", np.zeros((N_TRAIN, T), np.uint8)), "shape .* but manifest.json"),
        (lambda d: np.save(d / "test_hidden.npy", np.zeros((N_TEST, T + 1, 3), np.uint8)), "test_hidden.npy: shape"),
        (lambda d: (d / "train_tokens.npy").write_bytes(b"garbage"), "not a readable .npy"),
        (lambda d: _truncate(d / "train_tokens.npy", 10), "bytes, expected .*truncated"),
        (lambda d: _edit_manifest(d, lambda m: m["splits"]["train"].update(n=N_TRAIN + 1)), r"!= \[n, seq_len \+ 1\]"),
    ],
)
def test_manifest_checks(tmp_path, data_dir, damage, match):
    d = copy_of(data_dir, tmp_path)
    damage(d)
    with pytest.raises(DataError, match=match):
        TokenFileDataset(d)


def _truncate(path, n):
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def test_missing_directory_and_missing_hidden(tmp_path, data_dir, gssm):
    with pytest.raises(DataError, match="no such data directory"):
        load_manifest(tmp_path / "absent")
    out = tmp_path / "nohidden"
    write_dataset(out, gssm, 4, 3, 3, seed=0, progress_every=1e9)
    with pytest.raises(DataError, match="without hidden states"):
        TokenFileDataset(out, hidden=True)
    with pytest.raises(DataError, match="cannot read 22 per sequence"):
        TokenFileDataset(data_dir, length=T + 2)


# ----------------------------------------------------------------------------- sampler


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b, c = (ShardedShuffleSampler(50, seed=s) for s in (1, 1, 2))
    assert list(a) == list(b) and list(a) != list(c)
    assert sorted(a) == list(range(50))
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    assert a.shard(0).tolist() != a.shard(1).tolist()
    assert list(ShardedShuffleSampler(7, shuffle=False)) == list(range(7))


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (5, 5)])
def test_sampler_shards_disjoint_and_complete(n, world):
    for epoch in range(2):
        shards = []
        for rank in range(world):
            s = ShardedShuffleSampler(n, seed=3, rank=rank, world_size=world, drop_last=False)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s)
        flat = [i for s in shards for i in s]
        assert sorted(flat) == list(range(n))  # disjoint and complete
        dropped = [list(ShardedShuffleSampler(n, 3, r, world)) for r in range(world)]
        flat = [i for s in dropped for i in s]
        assert len({len(s) for s in dropped}) == 1 and len(set(flat)) == len(flat) == n - n % world


def test_sampler_resume():
    s = ShardedShuffleSampler(30, seed=5, rank=1, world_size=2)
    s.set_epoch(3)
    it = iter(s)
    head = [next(it) for _ in range(6)]
    state = s.state_dict()
    assert state == {"epoch": 3, "position": 6}
    t = ShardedShuffleSampler(30, seed=5, rank=1, world_size=2)
    t.load_state_dict(state)
    assert head + list(t) == s.shard(3).tolist()
    with pytest.raises(ValueError, match="rank"):
        ShardedShuffleSampler(30, rank=2, world_size=2)


# ----------------------------------------------------------------------------- dataset and stream


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # no GPU here: pinning is a no-op
def test_dataset_in_a_dataloader_with_workers_and_pinned_memory(data_dir):
    ds = TokenFileDataset(data_dir, length=T + 1)
    sampler = ShardedShuffleSampler(len(ds), seed=0)
    batches = BatchSampler(sampler, 16, drop_last=False)
    plain = list(DataLoader(ds, batch_sampler=batches, collate_fn=as_batch))
    got = list(DataLoader(ds, batch_sampler=batches, collate_fn=as_batch, num_workers=2, pin_memory=True))
    assert len(got) == len(plain) == 10
    assert all(torch.equal(u, v) for u, v in zip(plain, got))
    whole = torch.from_numpy(np.load(data_dir / "train_tokens.npy").astype(np.int64))
    assert torch.equal(torch.cat(got), whole[list(sampler)])
    assert torch.equal(ds[7], whole[7]) and torch.equal(ds[-1], whole[-1])
    with pytest.raises(IndexError):
        ds[N_TRAIN]


def test_file_stream_epochs_ranks_and_crop(data_dir, gssm):
    whole = torch.from_numpy(np.load(data_dir / "train_tokens.npy").astype(np.int64))
    streams = [FileStream(data_dir, 16, T, seed=1, rank=r, world_size=2, gssm=gssm) for r in range(2)]
    assert streams[0].batches_per_epoch == 4  # 75 sequences per rank, 4 full batches of 16
    epoch0 = [[next(s) for _ in range(4)] for s in streams]
    rows = {tuple(r.tolist()) for b in epoch0 for x in b for r in x}
    assert len(rows) == 2 * 4 * 16  # the ranks never share a sequence within an epoch
    assert all(x.shape == (16, T + 1) and x.dtype == torch.int64 for b in epoch0 for x in b)
    nxt = next(streams[0])
    assert streams[0].epoch == 1 and streams[0].batch == 1
    assert torch.equal(nxt, whole[streams[0].sampler.shard(1)[:16]])
    short = FileStream(data_dir, 8, 5, seed=1)  # a shorter seq_len reads each row's prefix
    assert torch.equal(next(short), whole[short.sampler.shard(0)[:8], :6])
    with pytest.raises(DataError, match="cannot read"):
        FileStream(data_dir, 8, T + 1, seed=1)
    with pytest.raises(DataError, match="fewer than batch_size"):
        FileStream(data_dir, 100, T, seed=1, world_size=2)
    with pytest.raises(DataError, match="another GSSM"):
        FileStream(data_dir, 8, T, seed=1, gssm=make_gssm(seed=4))


@pytest.mark.parametrize("stop_at,workers", [(3, 2), (9, 0), (18, 2)])  # mid-epoch, at its end, a later epoch
def test_file_stream_exact_resume(data_dir, stop_at, workers):
    make = lambda w: build_train_stream("files", path=data_dir, batch_size=16, seq_len=T, seed=2, num_workers=w)
    expected = [b for _, b in zip(range(stop_at + 5), make(0))]
    stream = make(workers)
    head = [next(stream) for _ in range(stop_at)]
    state = stream.state_dict()
    stream.close()
    resumed = make(0 if workers else 2)
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(5)]
    assert all(torch.equal(u, v) for u, v in zip(head + tail, expected))
    # 150 sequences make 9 batches of 16 per epoch; the state counts batches taken, not read ahead
    assert (state["epoch"], state["batch"]) == ((stop_at - 1) // 9, (stop_at - 1) % 9 + 1)
    with pytest.raises(ValueError, match="needs the directory"):
        build_train_stream("files", batch_size=16, seq_len=T, seed=2)


# ----------------------------------------------------------------------------- token ids within the vocabulary


def _poke(path, row, col, value):
    array = np.load(path, mmap_mode="r+")
    array[row, col] = value
    array.flush()


def test_the_writer_records_each_splits_token_range(data_dir, gssm):
    m = load_manifest(data_dir)
    for split in ("train", "test"):
        tokens = np.load(data_dir / f"{split}_tokens.npy")
        spec = m["splits"][split]["tokens"]
        assert (spec["min"], spec["max"]) == (int(tokens.min()), int(tokens.max()))
        assert 0 <= spec["min"] <= spec["max"] < gssm.vocab_size == 11


def test_token_ids_outside_the_vocabulary_are_refused_at_open(tmp_path, data_dir):
    d = copy_of(data_dir, tmp_path)
    _poke(d / "train_tokens.npy", 3, 5, 200)  # a uint8 file may hold ids up to 255, the vocabulary has 11
    _edit_manifest(d, lambda m: m["splits"]["train"]["tokens"].update(max=200))
    with pytest.raises(
        DataError, match=r"train_tokens.npy: token ids \d+..200 \(from manifest.json's .*\) fall outside"
    ):
        TokenFileDataset(d)


def test_an_old_manifest_without_the_range_is_scanned_once(tmp_path, data_dir, monkeypatch):
    from nanollama.data.gssm import reader

    d = copy_of(data_dir, tmp_path)
    _edit_manifest(d, lambda m: [m["splits"][s]["tokens"].pop(k) for s in ("train", "test") for k in ("min", "max")])
    scans = []
    real = reader.token_range
    monkeypatch.setattr(reader, "token_range", lambda path, **kw: scans.append(path.name) or real(path, **kw))
    assert len(TokenFileDataset(d)) == N_TRAIN  # in range: accepted
    assert scans == ["train_tokens.npy", "test_tokens.npy"]
    _poke(d / "test_tokens.npy", 0, 0, 11)
    with pytest.raises(DataError, match=r"test_tokens.npy: token ids 0..11 \(from a scan of the file\) fall outside"):
        TokenFileDataset(d)
    assert reader.token_range(d / "test_tokens.npy", chunk_rows=7) == (0, 11)  # chunked reads agree


def test_files_of_another_vocabulary_are_refused(tmp_path, data_dir, gssm):
    from nanollama.data.gssm.stream import check_same_graph

    d = copy_of(data_dir, tmp_path)
    _edit_manifest(d, lambda m: m.update(vocab_size=12))
    with pytest.raises(DataError, match="vocab_size 12 in its manifest, the run's graph has 11"):
        check_same_graph(json.loads((d / "manifest.json").read_text()), gssm, d)
