"""On-the-fly GSSM stream: per-rank/per-worker independence, worker-count invariance, exact resume."""

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from nanollama.data import seeds
from nanollama.data.gssm import GSSM, GSSMConfig, NodeConfig
from nanollama.data.gssm.onfly import OnTheFlyDataset
from nanollama.data.gssm.stream import OnTheFlyStream, build_train_stream

B, T = 4, 24


@pytest.fixture(scope="module")
def gssm():
    # alpha = 1: high-entropy sequences, so two equal rows of 25 tokens would mean a repeated seed
    cfg = GSSMConfig(
        nodes=[
            NodeConfig("h", state_dim=6, alpha=1.0),
            NodeConfig("x", state_dim=12, alpha=1.0, parents=["h"], observed=True),
        ]
    )
    return GSSM(cfg, seed=3)


def rows(batches):
    return [tuple(r.tolist()) for b in batches for r in b]


def take(loader_or_iter, n):
    return list(itertools.islice(iter(loader_or_iter), n))


def test_batches_shape_dtype_and_determinism(gssm):
    a = OnTheFlyDataset(gssm, B, T, seed=5)
    b = OnTheFlyDataset(gssm, B, T, seed=5)
    xa, xb = take(a, 3), take(b, 3)
    assert all(x.shape == (B, T + 1) and x.dtype == torch.int64 for x in xa)
    assert all(torch.equal(u, v) for u, v in zip(xa, xb))
    assert int(max(x.max() for x in xa)) < gssm.vocab_size
    # batch k is the sample drawn with the documented seed
    assert torch.equal(xa[2], gssm.sample(B, T + 1, seed=seeds.derive_seed(5, seeds.ONFLY, 2)))
    # another seed, another stream
    assert not torch.equal(xa[0], take(OnTheFlyDataset(gssm, B, T, seed=6), 1)[0])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
def test_worker_count_does_not_change_the_stream(gssm):
    ds = OnTheFlyDataset(gssm, B, T, seed=1)
    plain = take(ds, 7)
    for workers in (2, 3):
        got = take(DataLoader(ds, batch_size=None, num_workers=workers), 7)
        assert all(torch.equal(u, v) for u, v in zip(plain, got)), workers


def test_ranks_and_workers_never_repeat_a_sequence(gssm):
    batches = []
    for rank in range(3):
        ds = OnTheFlyDataset(gssm, B, T, seed=0, rank=rank, world_size=3)
        batches += take(DataLoader(ds, batch_size=None, num_workers=2), 6)
    seqs = rows(batches)
    assert len(seqs) == 3 * 6 * B
    assert len(set(seqs)) == len(seqs)
    seeds_used = {
        OnTheFlyDataset(gssm, B, T, seed=0, rank=r, world_size=3).batch_seed(k) for r in range(3) for k in range(6)
    }
    assert len(seeds_used) == 18


def test_seed_tags_stay_clear_of_the_trainers_keys():
    ours = {seeds.derive_seed(s, seeds.ONFLY, g) for s in range(3) for g in range(60)}
    files = {
        seeds.derive_seed(s, tag, c) for s in range(3) for tag in (seeds.FILE_TRAIN, seeds.FILE_TEST) for c in range(20)
    }
    trainer = {seeds.derive_seed(s, seeds.EVAL, i) for s in range(3) for i in range(60)}
    assert len(ours) == 180 and len(files) == 120
    assert not (ours & files) and not (ours & trainer) and not (files & trainer)
    with pytest.raises(ValueError, match="non-negative"):
        seeds.derive_seed(1, -1)


@pytest.mark.parametrize("workers_before,workers_after", [(0, 2), (2, 0)])
def test_exact_resume(gssm, workers_before, workers_after):
    make = lambda w: build_train_stream("onfly", gssm=gssm, batch_size=B, seq_len=T, seed=9, num_workers=w)
    full = make(0)
    expected = take(full, 8)
    stream = make(workers_before)
    head = take(stream, 5)  # the loader has read ahead of these: the state must not count that
    state = stream.state_dict()
    assert state["index"] == 5
    stream.close()
    resumed = make(workers_after)
    resumed.load_state_dict(state)
    tail = take(resumed, 3)
    assert all(torch.equal(u, v) for u, v in zip(head + tail, expected))


def test_state_from_another_stream_is_refused(gssm):
    state = OnTheFlyStream(gssm, B, T, seed=0).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        OnTheFlyStream(gssm, B + 1, T, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        OnTheFlyStream(gssm, B, T, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="missing 'world_size'"):
        OnTheFlyStream(gssm, B, T, seed=0).load_state_dict({k: v for k, v in state.items() if k != "world_size"})


def test_bad_arguments(gssm):
    with pytest.raises(ValueError, match="rank"):
        OnTheFlyDataset(gssm, B, T, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        OnTheFlyDataset(gssm, 0, T, seed=0)
    with pytest.raises(ValueError, match="num_workers"):
        OnTheFlyStream(gssm, B, T, seed=0, num_workers=-1)
    with pytest.raises(ValueError, match="needs the GSSM"):
        build_train_stream("onfly", batch_size=B, seq_len=T, seed=0)
    with pytest.raises(ValueError, match="data.source must be"):
        build_train_stream("web", gssm=gssm, batch_size=B, seq_len=T, seed=0)


def test_ranks_interleave_one_global_stream(gssm):
    """2 ranks with accumulation A see the batches 1 rank sees with accumulation 2A (loss parity)."""
    one = OnTheFlyDataset(gssm, B, T, seed=3)
    two = [OnTheFlyDataset(gssm, B, T, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [one.batch_seed(g) for g in range(6)] == [two[g % 2].batch_seed(g // 2) for g in range(6)]
