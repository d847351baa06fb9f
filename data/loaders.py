"""Reward-model pair batches and PPO query batches, from pairs in the stack-exchange-paired schema.

PairLoader (reward model, DPO): the texts "<bos>Question: {question}\n\nAnswer: {response}" for
response_j (chosen) and response_k (rejected), each side right-padded to its own longest row. For DPO
(`dpo=True`) each side ends with <eos>, as the policy's answers do, and the batch carries each side's
prompt length: the tokens that the query "<bos>Question: {question}\n\nAnswer:" shares with the full text,
so a loss can read the answer alone. Pairs where either side has more than `max_length` tokens are
dropped and counted (StackLLaMA: 512, `<=` kept), or with `truncate=True` cut to their first `max_length`
tokens (question first, then as much of the answer as fits; a pair whose query alone fills the window is
still dropped; a cut DPO side loses its <eos>). Each pair keeps its sides' full lengths, so "the longer
answer wins" is judged on the whole answers either way. Epochs: the rank's pairs in a fresh order drawn from
(seed, rank, epoch); iterating yields the rest of the current epoch, so `for epoch ...: for batch in
loader` resumes mid-epoch after load_state_dict. Every rank gets the same number of pairs (a remainder of
fewer than world_size pairs is left out), so data-parallel ranks take the same number of steps.

PromptLoader (PPO): each distinct question once, as the query "<bos>Question: {question}\n\nAnswer:" (no
space: the policy writes it with its answer's first word, as in every text it learnt from; data/tokenizer.py),
kept if it has fewer than `max_length` tokens (StackLLaMA: < 512), left-padded so every row's last
column is its last prompt token and generation appends to all rows in step. Endless: epoch after epoch,
each in a fresh seeded order; a batch may span two epochs.

Masks are bool, True on real tokens. The pad id is the tokenizer's (data/tokenizer.py): never eos,
and only ever read through the mask.

Reference: TRL examples/research_projects/stack_llama/scripts/reward_modeling.py and rl_training.py.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import torch

from rlhf_engine.data.tokenizer import format_prompt, shared_prefix


class PairBatch(NamedTuple):
    chosen_tokens: torch.Tensor  # [B, Lc] int64, right-padded with pad_id
    chosen_mask: torch.Tensor  # [B, Lc] bool
    rejected_tokens: torch.Tensor  # [B, Lr] int64, right-padded with pad_id
    rejected_mask: torch.Tensor  # [B, Lr] bool
    chosen_prompt_lengths: torch.Tensor | None = None  # [B] int64: tokens before the answer (dpo loaders only)
    rejected_prompt_lengths: torch.Tensor | None = None  # [B] int64


class QueryBatch(NamedTuple):
    tokens: torch.Tensor  # [B, L] int64, left-padded with pad_id
    attention_mask: torch.Tensor  # [B, L] bool


class PairCounts(NamedTuple):
    pairs: int  # rows in the table
    too_long: int  # dropped: a side has more than max_length tokens (truncate: the query alone fills them)
    unbalanced: int  # left out so that every rank has the same number of pairs
    rank_pairs: int  # this rank's pairs per epoch
    truncated: int = 0  # kept with a side cut to max_length tokens (truncate only)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ([B, max_len] int64, [B, max_len] bool mask), padded on the right (or left)."""
    width = max(map(len, seqs), default=0)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, seq in enumerate(seqs):
        columns = slice(width - len(seq), width) if left else slice(0, len(seq))
        tokens[i, columns] = torch.tensor(seq, dtype=torch.int64)
        mask[i, columns] = True
    return tokens, mask


def filter_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
                 max_length: int, answer_starts: Sequence[tuple[int, int]] | None = None) -> tuple[list[int], int]:
    """Indices of the pairs that fit in max_length tokens, and how many were dropped. A pair fits when both
    sides have at most max_length tokens, or, given answer_starts (each side's first answer token: truncation),
    when both sides keep at least one answer token once cut to max_length."""
    if answer_starts is None:
        fits = [len(c) <= max_length and len(r) <= max_length for c, r in zip(chosen, rejected)]
    else:
        fits = [c < max_length and r < max_length for c, r in answer_starts]
    keep = [i for i, fit in enumerate(fits) if fit]
    return keep, len(chosen) - len(keep)


def _epoch_order(n: int, seed: int, rank: int, epoch: int, shuffle: bool) -> np.ndarray:
    return np.random.default_rng([seed, rank, epoch]).permutation(n) if shuffle else np.arange(n)


def _check_layout(batch_size: int, rank: int, world_size: int, seed: int):
    if batch_size < 1 or seed < 0:
        raise ValueError(f"batch_size must be positive and seed non-negative, got {batch_size} and {seed}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _check_state(kind: str, state: dict, layout: dict):
    for key, value in layout.items():
        if state.get(key) != value:
            raise ValueError(f"{kind} state was saved with {key}={state.get(key)!r}, this loader has "
                             f"{key}={value!r}; resuming would not continue the same order")


class PairLoader:
    """Reward-model batches (PairBatch) of `batch_size` pairs for rank `rank` of `world_size`."""

    def __init__(self, pairs: pa.Table, tokenizer, *, batch_size: int, max_length: int = 512, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, source: str | None = None,
                 dpo: bool = False, truncate: bool = False):
        """source: where the pairs come from, for error messages. dpo: sides end with eos, prompt lengths kept.
        truncate: cut sides longer than max_length instead of dropping the pair."""
        _check_layout(batch_size, rank, world_size, seed)
        questions = pairs["question"].to_pylist()
        chosen, rejected = (
            tokenizer.encode_batch([format_prompt(q, a) for q, a in zip(questions, pairs[side].to_pylist())], bos=True,
                                   eos=dpo)
            for side in ("response_j", "response_k"))
        starts = None  # per pair: where each side's answer starts (dpo and truncate only)
        if dpo or truncate:
            prompts = tokenizer.encode_batch([format_prompt(q) for q in questions], bos=True)
            starts = [(shared_prefix(p, c), shared_prefix(p, r)) for p, c, r in zip(prompts, chosen, rejected)]
        keep, too_long = filter_pairs(chosen, rejected, max_length, starts if truncate else None)
        per_rank = len(keep) // world_size
        if per_rank == 0:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}{len(keep)} of {len(chosen)} pairs fit in --max-length {max_length} tokens; "
                             f"{world_size} rank(s) need at least one each")
        mine = keep[rank::world_size][:per_rank]
        # Full lengths, before any cut: "the longer answer wins" reads these.
        self.chosen_length, self.rejected_length = [len(chosen[i]) for i in mine], [len(rejected[i]) for i in mine]
        self.chosen, self.rejected = [chosen[i][:max_length] for i in mine], [rejected[i][:max_length] for i in mine]
        self.chosen_prompt = self.rejected_prompt = None  # per pair: tokens before the answer (dpo only)
        if dpo:
            self.chosen_prompt, self.rejected_prompt = ([starts[i][side] for i in mine] for side in (0, 1))
        cut = sum(max(len(chosen[i]), len(rejected[i])) > max_length for i in keep)
        self.stats = PairCounts(len(chosen), too_long, len(keep) - per_rank * world_size, per_rank, cut)
        self.pad_id, self.batch_size, self.seed, self.rank, self.world_size = (
            tokenizer.pad_id, batch_size, seed, rank, world_size)
        self.shuffle = shuffle
        self.epoch, self.index = 0, 0  # cursor: pairs of this epoch's order already yielded

    def __len__(self) -> int:
        return -(-len(self.chosen) // self.batch_size)

    def __iter__(self):
        n = len(self.chosen)
        if self.index >= n:
            self.epoch, self.index = self.epoch + 1, 0
        order = _epoch_order(n, self.seed, self.rank, self.epoch, self.shuffle)
        while self.index < n:
            rows = order[self.index:self.index + self.batch_size]
            self.index += len(rows)
            prompt_lengths = () if self.chosen_prompt is None else tuple(
                torch.tensor([lengths[i] for i in rows]) for lengths in (self.chosen_prompt, self.rejected_prompt))
            yield PairBatch(*pad([self.chosen[i] for i in rows], self.pad_id),
                            *pad([self.rejected[i] for i in rows], self.pad_id), *prompt_lengths)
        self.epoch, self.index = self.epoch + 1, 0

    def _layout(self) -> dict:
        return dict(batch_size=self.batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size,
                    shuffle=self.shuffle, rank_pairs=len(self.chosen))

    def state_dict(self) -> dict:
        return dict(self._layout(), epoch=self.epoch, index=self.index)

    def load_state_dict(self, state: dict) -> None:
        _check_state("pair loader", state, self._layout())
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class PromptLoader:
    """Endless PPO query batches (QueryBatch) of `batch_size` distinct questions for rank `rank`."""

    def __init__(self, pairs: pa.Table, tokenizer, *, batch_size: int, max_length: int = 512, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        _check_layout(batch_size, rank, world_size, seed)
        questions = list(dict.fromkeys(pairs["question"].to_pylist()))  # a question recurs in each of its pairs
        queries = tokenizer.encode_batch([format_prompt(q) for q in questions], bos=True)
        keep = [i for i, q in enumerate(queries) if len(q) < max_length]
        mine = keep[rank::world_size]
        if not mine:
            raise ValueError(f"{len(keep)} of {len(questions)} questions are shorter than max_length={max_length} "
                             f"tokens; rank {rank} of {world_size} gets none")
        self.queries = [queries[i] for i in mine]
        self.too_long = len(questions) - len(keep)
        self.pad_id, self.batch_size, self.seed, self.rank, self.world_size = (
            tokenizer.pad_id, batch_size, seed, rank, world_size)
        self.position = 0  # queries yielded so far; epoch = position // len(self.queries)

    def __iter__(self):
        n, orders = len(self.queries), {}
        while True:
            rows = []
            for p in range(self.position, self.position + self.batch_size):
                if p // n not in orders:  # positions only grow, so older epochs are done with
                    orders = {p // n: _epoch_order(n, self.seed, self.rank, p // n, True)}
                rows.append(int(orders[p // n][p % n]))
            self.position += self.batch_size
            yield QueryBatch(*pad([self.queries[i] for i in rows], self.pad_id, left=True))

    def _layout(self) -> dict:
        return dict(batch_size=self.batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size,
                    rank_queries=len(self.queries))

    def state_dict(self) -> dict:
        return dict(self._layout(), position=self.position)

    def load_state_dict(self, state: dict) -> None:
        _check_state("prompt loader", state, self._layout())
        self.position = int(state["position"])
