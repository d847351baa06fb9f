"""The SFT loader: documents packed end to end into fixed-length rows with no padding.

Each document is "<bos>Question: {question}\n\nAnswer: {response_j}<eos>" (StackLLaMA's
ConstantLengthDataset joins texts with EOS the same way). A shard's documents are concatenated, in a
fresh seeded order every epoch, into one endless token stream, and the stream is cut into rows:

    row c:  tokens  = stream[c*T     : c*T + T]
            targets = stream[c*T + 1 : c*T + T + 1]

so consecutive rows share one token (the last target of a row is the first input of the next) and
every token of the stream is a target exactly once. The loss at the <eos> of one document predicts
the <bos> of the next, a constant the model learns at once. Single-epoch mode stops at the last
complete row of the first epoch: fewer than T + 1 tokens at the end are not used.

Alongside the tokens: position_ids restart at 0 where a document starts (a row that begins inside a
document continues its positions), and document_ids number the documents within the row from 0.
`document_causal_mask` turns them into an attention mask that keeps each token inside its own
document. StackLLaMA let attention cross documents; Krell et al. 2021 ("Efficient Sequence Packing
without Cross-contamination") and Zhao et al. 2024 ("Analysing the Impact of Sequence Composition on
Language Model Pre-Training") show the contamination matters, so SFT makes it a flag.

Sharding: document d belongs to rank d mod world_size, so shards are disjoint and together complete.
Each shard's order is drawn from (seed, rank, epoch). The cursor is one stream position, saved in
checkpoints, so a resumed loader yields exactly the batches an uninterrupted one would have.

Reference: TRL's ConstantLengthDataset (StackLLaMA's SFT); llama2.c tinystories.py PretokDataset
(sharding by rank); arXiv:2107.02027 and arXiv:2402.13991.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import torch

from rlhf_engine.data.tokenizer import format_prompt


class Documents(NamedTuple):
    tokens: np.ndarray  # [N] int32: all documents end to end
    offsets: np.ndarray  # [D + 1] int64: document d is tokens[offsets[d] : offsets[d + 1]]


class PackedBatch(NamedTuple):
    tokens: torch.Tensor  # [B, T] int64: model input
    targets: torch.Tensor  # [B, T] int64: the next token of each input token
    position_ids: torch.Tensor  # [B, T] int64: position within the token's document
    document_ids: torch.Tensor  # [B, T] int64: 0 for the row's first document, then 1, 2, ...


def make_documents(token_lists: Sequence[Sequence[int]]) -> Documents:
    """Pack token lists into flat arrays; empty lists are dropped (they would hold no token)."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    keep = [t for t, n in zip(token_lists, lengths) if n]
    offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(lengths[lengths > 0], out=offsets[1:])
    tokens = np.fromiter((i for t in keep for i in t), dtype=np.int32, count=int(offsets[-1]))
    return Documents(tokens, offsets)


def sft_documents(pairs: pa.Table, tokenizer, dedupe: bool = True) -> Documents:
    """One document per pair: <bos> Question: q \\n\\nAnswer: response_j <eos>.

    A question's best answer is response_j of up to 9 other pairs too; `dedupe` keeps each distinct
    text once, so SFT does not weight a question by how many answers it had (StackLLaMA did not dedupe).
    """
    texts = [format_prompt(q, a) for q, a in zip(pairs["question"].to_pylist(), pairs["response_j"].to_pylist())]
    if dedupe:
        texts = list(dict.fromkeys(texts))
    return make_documents(tokenizer.encode_batch(texts, bos=True, eos=True))


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool, True where query i may attend to key j (same document, j <= i)."""
    T = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


def shard_documents(n_documents: int, shard: int, n_shards: int) -> np.ndarray:
    """Indices of the documents shard `shard` of `n_shards` owns: every n_shards-th, from `shard`."""
    return np.arange(shard, n_documents, n_shards)


class _ShardStream:
    """One shard's endless stream: epoch e is its documents in the order drawn from (seed, rank, e).

    Position p of the stream is token p % L of epoch p // L, where L is the shard's token count.
    """

    def __init__(self, docs: Documents, doc_ids: np.ndarray, seed: int, rank: int, shuffle: bool):
        self.docs, self.doc_ids, self.shuffle = docs, doc_ids, shuffle
        self.seed_prefix = [seed, rank, 0]  # the 0 once numbered loader workers; kept so every stream is unchanged
        self.lengths = docs.offsets[doc_ids + 1] - docs.offsets[doc_ids]
        self.length = int(self.lengths.sum())
        self.cache: dict[int, tuple[np.ndarray, ...]] = {}

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, positions in document, document ordinals) of epoch e, each [L]."""
        if e not in self.cache:
            n = len(self.doc_ids)
            order = np.random.default_rng(self.seed_prefix + [e]).permutation(n) if self.shuffle else np.arange(n)
            lengths = self.lengths[order]
            ordinal = np.repeat(np.arange(n, dtype=np.int64) + e * n, lengths)  # unique across epochs
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            positions = np.arange(self.length, dtype=np.int64) - starts
            source = self.docs.offsets[self.doc_ids[order]]
            tokens = self.docs.tokens[np.repeat(source, lengths) + positions]
            self.cache = {k: v for k, v in self.cache.items() if k == e - 1}  # a window spans <= 2 epochs
            self.cache[e] = (tokens, positions, ordinal)
        return self.cache[e]

    def window(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stream positions [start, start + n), crossing into later epochs as needed."""
        pieces = []
        while n > 0:
            e, offset = divmod(start, self.length)
            take = min(n, self.length - offset)
            pieces.append([a[offset:offset + take] for a in self.epoch(e)])
            start, n = start + take, n - take
        return tuple(np.concatenate(parts) for parts in zip(*pieces))


class PackingLoader:
    """Batches of `batch_size` packed rows of `seq_len` tokens for rank `rank` of `world_size`.

    Iterating yields PackedBatch; `infinite=False` ends after one epoch (the last batch may have fewer
    rows). Iterating again continues from the cursor, which state_dict()/load_state_dict() save and
    restore. Packing is a few numpy slices per batch, so it runs in the training process.
    """

    def __init__(self, docs: Documents, *, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, infinite: bool = True, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        n_documents = len(docs.offsets) - 1
        if n_documents < world_size:
            raise ValueError(f"{n_documents} documents cannot fill {world_size} ranks; every rank needs at least one")
        self.docs, self.seq_len, self.batch_size, self.seed = docs, seq_len, batch_size, seed
        self.rank, self.world_size, self.infinite, self.shuffle = rank, world_size, infinite, shuffle
        self.stream = _ShardStream(docs, shard_documents(n_documents, rank, world_size), seed, rank, shuffle)
        self.position = 0  # stream position of the next row

    def __iter__(self):
        T = self.seq_len
        while True:
            left = (self.stream.length - 1 - self.position) // T
            rows = self.batch_size if self.infinite else min(self.batch_size, left)
            if rows <= 0:
                return
            tokens, positions, ordinals = self.stream.window(self.position, rows * T + 1)
            ordinals = ordinals[:-1].reshape(rows, T)
            self.position += rows * T
            yield PackedBatch(
                tokens=torch.from_numpy(tokens[:-1].astype(np.int64).reshape(rows, T)),
                targets=torch.from_numpy(tokens[1:].astype(np.int64).reshape(rows, T)),
                position_ids=torch.from_numpy(positions[:-1].reshape(rows, T).copy()),
                document_ids=torch.from_numpy(ordinals - ordinals[:, :1]))

    def _layout(self) -> dict:
        return dict(seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed, rank=self.rank,
                    world_size=self.world_size, infinite=self.infinite, shuffle=self.shuffle,
                    documents=len(self.docs.offsets) - 1, tokens=len(self.docs.tokens))

    def state_dict(self) -> dict:
        return dict(self._layout(), position=self.position)

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(); the data and the loader's settings must be the ones it was saved with."""
        for key, value in self._layout().items():
            if state.get(key) != value:
                raise ValueError(f"packing loader state was saved with {key}={state.get(key)!r}, "
                                 f"this loader has {key}={value!r}; resuming would not continue the same stream")
        self.position = int(state["position"])
