"""The SFT packing loader: exact stream, no padding, ids, shards, resume (data/packing.py)."""
import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from rlhf_engine.data.packing import PackingLoader, document_causal_mask, make_documents, sft_documents, shard_documents
from rlhf_engine.data.tokenizer import Tokenizer, format_prompt

BOS, EOS = 1, 2


def marked_docs(n):
    """Document d is <bos>, d % 5 + 1 copies of the marker 100 + d, <eos>: its marker names it."""
    return [[BOS] + [100 + d] * (d % 5 + 1) + [EOS] for d in range(n)]


def stream_of(batches):
    """The token stream the rows were cut from: every row's inputs, then the last row's final target."""
    rows = [(t, g) for b in batches for t, g in zip(b.tokens, b.targets)]
    return torch.cat([t for t, _ in rows] + [rows[-1][1][-1:]]).tolist()


def take(loader, k):
    return list(itertools.islice(iter(loader), k))


def same(a, b):
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q)) for p, q in zip(a, b))


def test_rows_are_the_stream_cut_without_padding():
    docs = marked_docs(20)
    batches = list(PackingLoader(make_documents(docs), seq_len=7, batch_size=4, infinite=False, shuffle=False))
    stream = [t for d in docs for t in d]  # lengths 3, 4, 5, 6, 7 four times: 100 tokens
    # (100 - 1) // 7 = 14 rows use tokens 0..98 (the 99th only as a target); token 99 is left over
    assert [b.tokens.shape for b in batches] == [(4, 7), (4, 7), (4, 7), (2, 7)]
    assert stream_of(batches) == stream[:99]
    for b in batches:
        assert b.tokens.dtype == b.targets.dtype == torch.int64
        assert torch.equal(b.targets[:, :-1], b.tokens[:, 1:])  # targets are the next tokens
    # consecutive rows overlap by one token: a row's last target is the next row's first input
    rows = torch.cat([b.tokens for b in batches]), torch.cat([b.targets for b in batches])
    assert torch.equal(rows[1][:-1, -1], rows[0][1:, 0])


def test_positions_and_document_ids_by_hand():
    docs = make_documents([[1, 5, 2], [1, 6, 6, 2], [1, 7, 2]])  # stream 1 5 2 1 6 6 2 1 7 2
    (b,) = PackingLoader(docs, seq_len=4, batch_size=2, infinite=False, shuffle=False)
    assert b.tokens.tolist() == [[1, 5, 2, 1], [6, 6, 2, 1]]
    assert b.targets.tolist() == [[5, 2, 1, 6], [6, 2, 1, 7]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0], [1, 2, 3, 0]]  # row 2 starts inside document 2
    assert b.document_ids.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1]]


def test_document_causal_mask_by_hand():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0],
                                         [0, 0, 1, 1, 1]]


def test_sft_documents_are_bos_text_eos_and_deduplicated(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    pairs = pa.table({"question": ["how do i store coffee", "how do i store coffee", "why does my bike chain skip"],
                      "response_j": ["keep them away from light", "keep them away from light", "adjust the cable"]})
    docs = sft_documents(pairs, tok)
    assert len(docs.offsets) - 1 == 2
    texts = [format_prompt("how do i store coffee", "keep them away from light"),
             format_prompt("why does my bike chain skip", "adjust the cable")]
    assert docs.tokens.tolist() == [t for text in texts for t in tok.encode(text, bos=True, eos=True)]
    assert len(sft_documents(pairs, tok, dedupe=False).offsets) - 1 == 3
    (b,) = PackingLoader(docs, seq_len=16, batch_size=8, infinite=False, shuffle=False)
    stream = stream_of([b])
    first = docs.offsets[1]
    assert stream[first - 1] == tok.eos_id and stream[first] == tok.bos_id  # EOS then BOS between documents


def test_shard_documents_disjoint_and_complete():
    for n, shards in ((10, 3), (7, 7), (100, 8)):
        parts = [set(shard_documents(n, s, shards).tolist()) for s in range(shards)]
        assert set().union(*parts) == set(range(n)) and sum(map(len, parts)) == n


@pytest.mark.parametrize("world_size", [1, 3])
def test_rank_shards_are_disjoint_and_complete(world_size):
    docs = marked_docs(45)
    seen = []
    for rank in range(world_size):
        loader = PackingLoader(make_documents(docs), seq_len=8, batch_size=2, seed=5, rank=rank,
                               world_size=world_size)
        stream = stream_of(take(loader, 40))
        shard = shard_documents(len(docs), rank, world_size)
        epoch_tokens = sum(len(docs[d]) for d in shard)
        first_epoch = stream[:epoch_tokens]
        order = [t - 100 for i, t in enumerate(first_epoch) if t >= 100 and first_epoch[i - 1] == BOS]
        assert sorted(order) == shard.tolist()  # each shard's first epoch holds exactly its documents
        assert first_epoch == [t for d in order for t in docs[d]]
        seen.append(set(order))
    assert set().union(*seen) == set(range(len(docs))) and sum(map(len, seen)) == len(docs)


def test_epochs_reshuffle_and_seeds_matter():
    docs = make_documents(marked_docs(30))

    def epoch_orders(seed, epochs=2):
        stream = stream_of(take(PackingLoader(docs, seq_len=10, batch_size=4, seed=seed), 10))
        order = [t - 100 for i, t in enumerate(stream) if t >= 100 and stream[i - 1] == BOS]
        return order[:30], order[30:60]

    first, second = epoch_orders(0)
    assert sorted(first) == sorted(second) == list(range(30)) and first != second
    assert epoch_orders(0) == (first, second)
    assert epoch_orders(1)[0] != first


@pytest.mark.parametrize("infinite", [True, False])
def test_resume_continues_the_identical_stream(infinite):
    docs = make_documents(marked_docs(23))
    settings = dict(seq_len=8, batch_size=3, seed=7, rank=1, world_size=2, infinite=infinite)
    uninterrupted = take(PackingLoader(docs, **settings), 12)
    for k in (1, 4, 5):
        first = PackingLoader(docs, **settings)
        head = take(first, k)
        resumed = PackingLoader(docs, **settings)
        resumed.load_state_dict(first.state_dict())
        assert same(head + take(resumed, 12 - k), uninterrupted), k
    if not infinite:  # the state after a whole epoch resumes to nothing more
        done = PackingLoader(docs, **settings)
        n = len(list(done))
        assert n == len(uninterrupted) < 12
        again = PackingLoader(docs, **settings)
        again.load_state_dict(done.state_dict())
        assert list(again) == []


def test_state_from_another_layout_is_refused():
    docs = make_documents(marked_docs(10))
    state = PackingLoader(docs, seq_len=8, batch_size=2).state_dict()
    with pytest.raises(ValueError, match="saved with world_size=1, this loader has world_size=2"):
        PackingLoader(docs, seq_len=8, batch_size=2, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        PackingLoader(docs, seq_len=16, batch_size=2).load_state_dict(state)


def test_bad_settings():
    docs = make_documents(marked_docs(3))
    with pytest.raises(ValueError, match="3 documents cannot fill 4 ranks"):
        PackingLoader(docs, seq_len=8, batch_size=2, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        PackingLoader(docs, seq_len=8, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="positive"):
        PackingLoader(docs, seq_len=0, batch_size=2)


def test_make_documents_drops_empty_lists():
    docs = make_documents([[1, 2], [], [3]])
    assert docs.tokens.tolist() == [1, 2, 3] and docs.offsets.tolist() == [0, 2, 3]
    assert docs.tokens.dtype == np.int32
