import pytest
import torch

from nanollama.data.batch import IGNORE, lay_out, rows_needed


def source_and_nll(rows: int, T1: int):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 7, (rows, T1), generator=g), torch.rand(rows, T1, generator=g, dtype=torch.float64)


def test_causal_scores_every_next_token():
    src, nll = source_and_nll(3, 11)
    b = lay_out("causal", src, torch.Generator(), nll=nll)
    assert torch.equal(b.inputs, src[:, :-1]) and torch.equal(b.targets, src[:, 1:])
    assert b.mask is None and b.positions is None and torch.equal(b.bayes, nll[:, 1:])


def test_prefix_lm_leaves_the_visible_prompt_unscored():
    src, nll = source_and_nll(64, 21)
    b = lay_out("prefix_lm", src, torch.Generator().manual_seed(3), prefix_max=0.5, nll=nll)
    prefix = b.mask.prefix_lengths
    assert prefix.min() >= 1 and prefix.max() <= 10 and len(set(prefix.tolist())) > 3
    for row, p in enumerate(prefix.tolist()):
        scored = b.targets[row] != IGNORE
        # input i sees tokens j < p: target i + 1 is visible iff i + 1 < p
        assert scored.tolist() == [i + 1 >= p for i in range(20)]
        assert torch.equal(b.targets[row][scored], src[row, 1:][scored])
        assert torch.equal(b.bayes[row][scored], nll[row, 1:][scored]) and (b.bayes[row][~scored] == 0).all()
    dense = b.mask.dense(64, 20, 20)
    assert dense[0, 0, prefix[0] - 1] and not dense[0, 0, prefix[0]]


def test_documents_are_prefixes_of_distinct_sequences_with_end_tokens():
    T, doc_min, eos, B = 40, 6, 99, 3
    per_row = rows_needed("document", T, doc_min)
    assert per_row == 6  # at most 41 // 7 + 1 documents of >= 6 tokens and an end token in 41 slots
    src, nll = source_and_nll(B * per_row, T + 1)
    b = lay_out("document", src, torch.Generator().manual_seed(1), doc_min=doc_min, eos=eos, nll=nll)
    tokens = torch.cat([b.inputs, b.targets[:, -1:]], dim=1)  # the packed rows (the last target may be an end token)
    tokens[:, -1] = torch.where(b.targets[:, -1] == IGNORE, eos, tokens[:, -1])
    doc_ids, positions = b.mask.document_ids, b.positions
    for row in range(B):
        ends = (tokens[row] == eos).nonzero().flatten().tolist()
        assert ends, "a 41-token row holds more than one document"
        start = 0
        for doc, end in enumerate(ends + [T + 1]):
            length = end - start
            segment = tokens[row, start:end]
            assert torch.equal(segment, src[row * per_row + doc, :length])  # a prefix of its own sequence
            if doc < len(ends):
                assert length >= doc_min
            if start < T:
                assert (doc_ids[row, start : min(end + 1, T)] == doc).all()
                assert positions[row, start : min(end + 1, T)].tolist() == list(range(min(end + 1, T) - start))
            # the first token of a later document is scored with a fresh sequence's first-token NLL
            if doc > 0:
                assert b.targets[row, start - 1] == src[row * per_row + doc, 0]
                assert b.bayes[row, start - 1] == nll[row * per_row + doc, 0]
            start = end + 1
        for end in ends:  # end tokens are never scored
            if end >= 1:
                assert b.targets[row, end - 1] == IGNORE and b.bayes[row, end - 1] == 0


def test_unknown_mask_and_missing_end_token():
    src, _ = source_and_nll(2, 5)
    with pytest.raises(ValueError, match="data.mask"):
        lay_out("bidirectional", src, torch.Generator())
    with pytest.raises(ValueError, match="end token"):
        lay_out("document", src, torch.Generator(), doc_min=2)
