"""Reward-model pair batches and PPO query batches (data/loaders.py), with hand-countable lengths."""
import itertools

import pyarrow as pa
import pytest
import torch

from rlhf_engine.data.loaders import PairLoader, PromptLoader, filter_pairs, pad
from rlhf_engine.data.tokenizer import format_prompt

PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """One token per character, so a text's length is its token count: "Question: " and
    "\\n\\nAnswer: " are 10 characters each, and format_prompt(q, a) with <bos> is 21 + len(q) + len(a); the
    query format_prompt(q) stops before the space: 20 + len(q)."""
    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode(self, text, bos=False, eos=False):
        return [BOS] * bos + [3 + ord(c) % 1000 for c in text] + [EOS] * eos

    def encode_batch(self, texts, bos=False, eos=False):
        return [self.encode(t, bos, eos) for t in texts]

    @staticmethod
    def question(ids):
        """The question back from a query's tokens (<bos> Question: q\n\nAnswer:), padding dropped."""
        return "".join(chr(i - 3) for i in ids if i > EOS)[len("Question: "):-len("\n\nAnswer:")]


TOK = CharTokenizer()


def pairs_table(rows):
    return pa.table({"question": [q for q, _, _ in rows], "response_j": [j for _, j, _ in rows],
                     "response_k": [k for _, _, k in rows]})


def test_pad_right_and_left():
    tokens, mask = pad([[5, 6, 7], [8]], PAD)
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[True] * 3, [True, False, False]]
    tokens, mask = pad([[5, 6, 7], [8]], PAD, left=True)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[True] * 3, [False, False, True]]


# ---- pair loader --------------------------------------------------------------------------------

def test_pair_length_filter_by_hand():
    table = pairs_table([("ab", "cd", "e"),       # 25 and 24 tokens: kept at max_length 25
                         ("ab", "cdef", "e"),     # chosen 27: dropped
                         ("ab", "c", "efgh"),     # rejected 27: dropped
                         ("xy", "zz", "zz")])     # 25 and 25: kept (StackLLaMA keeps <= max_length)
    loader = PairLoader(table, TOK, batch_size=2, max_length=25, shuffle=False)
    assert loader.stats == (4, 2, 0, 2, 0)  # pairs, too_long, unbalanced, rank_pairs, truncated
    assert filter_pairs([[0] * 25, [0] * 26], [[0] * 3, [0] * 3], 25) == ([0], 1)


def test_pair_truncation_by_hand():
    """truncate=True: a side longer than max_length keeps its first max_length tokens, a pair whose query fills
    the window is still dropped, and the full lengths stay for "the longer answer wins"."""
    table = pairs_table([("ab", "cdef", "e"),        # 27 and 24 tokens: chosen cut to 25
                         ("ab", "cdefgh", "cdefg"),  # 29 and 28: both cut to 25
                         ("abcd", "x", "y"),         # query 24 tokens: its answer's space still fits
                         ("abcde", "x", "y")])       # query 25 tokens: no answer token fits, dropped
    loader = PairLoader(table, TOK, batch_size=4, max_length=25, shuffle=False, truncate=True)
    assert loader.stats == (4, 1, 0, 3, 3)  # pairs, too_long, unbalanced, rank_pairs, truncated
    assert loader.chosen_length == [27, 29, 26] and loader.rejected_length == [24, 28, 26]
    (batch,) = loader
    assert batch.chosen_mask.sum(1).tolist() == [25, 25, 25] and batch.rejected_mask.sum(1).tolist() == [24, 25, 25]
    assert batch.chosen_tokens[1].tolist() == TOK.encode(format_prompt("ab", "cdefgh"), bos=True)[:25]
    assert batch.rejected_tokens[0, :24].tolist() == TOK.encode(format_prompt("ab", "e"), bos=True)  # uncut
    dpo = PairLoader(table, TOK, batch_size=4, max_length=25, shuffle=False, truncate=True, dpo=True)
    assert dpo.chosen_prompt == [22, 22, 24] and dpo.chosen[0][-1] != EOS  # the cut took the eos
    assert filter_pairs([[0] * 30, [0] * 30], [[0] * 3, [0] * 3], 25, [(24, 20), (25, 20)]) == ([0], 1)


def test_pair_batches_are_right_padded_separately():
    table = pairs_table([("ab", "cd", "e"), ("q", "r", "stuvw")])
    (batch,) = PairLoader(table, TOK, batch_size=2, max_length=512, shuffle=False)
    assert batch.chosen_tokens.shape == (2, 25) and batch.rejected_tokens.shape == (2, 27)
    assert batch.chosen_tokens[0].tolist() == [BOS] + TOK.encode(format_prompt("ab", "cd"))
    assert batch.chosen_tokens[1].tolist() == [BOS] + TOK.encode(format_prompt("q", "r")) + [PAD] * 2
    assert batch.chosen_mask.sum(1).tolist() == [25, 23] and batch.rejected_mask.sum(1).tolist() == [24, 27]
    assert batch.chosen_mask.dtype == torch.bool and batch.chosen_tokens.dtype == torch.int64
    assert (batch.rejected_tokens[~batch.rejected_mask] == PAD).all()
    assert batch.rejected_tokens[1, -1].item() == 3 + ord("w")  # the longest side has no padding


def questions_of(batches):
    return [chr(b.chosen_tokens[i, 11].item() - 3) for b in batches for i in range(len(b.chosen_tokens))]


def epochs(loader, n):
    """n epochs of batches; iterating a PairLoader yields the rest of its current epoch."""
    return [list(loader) for _ in range(n)]


def test_pair_epochs_shuffle_reproducibly():
    table = pairs_table([(q, "good", "bad") for q in "abcdefghij"])
    a = [questions_of(e) for e in epochs(PairLoader(table, TOK, batch_size=3, seed=4), 3)]
    assert all(sorted(e) == list("abcdefghij") for e in a) and a[0] != a[1]
    assert a == [questions_of(e) for e in epochs(PairLoader(table, TOK, batch_size=3, seed=4), 3)]
    assert a != [questions_of(e) for e in epochs(PairLoader(table, TOK, batch_size=3, seed=5), 3)]
    assert len(PairLoader(table, TOK, batch_size=3)) == 4  # 3 + 3 + 3 + 1


def test_pair_ranks_are_disjoint_and_equal_sized():
    table = pairs_table([(q, "good", "bad") for q in "abcdefghij"])
    ranks = [PairLoader(table, TOK, batch_size=2, rank=r, world_size=3) for r in range(3)]
    seen = [set(questions_of(list(loader))) for loader in ranks]
    assert [len(s) for s in seen] == [3, 3, 3] and len(set().union(*seen)) == 9
    assert ranks[0].stats.unbalanced == 1


def test_pair_resume_mid_epoch():
    table = pairs_table([(q, "good", "bad") for q in "abcdefghij"])
    full = [questions_of(e) for e in epochs(PairLoader(table, TOK, batch_size=3, seed=1), 3)]
    first = PairLoader(table, TOK, batch_size=3, seed=1)
    head = list(itertools.islice(iter(first), 2))  # 2 of epoch 0's 4 batches
    resumed = PairLoader(table, TOK, batch_size=3, seed=1)
    resumed.load_state_dict(first.state_dict())
    rest = [questions_of(e) for e in epochs(resumed, 3)]
    assert questions_of(head) + rest[0] == full[0] and rest[1:] == full[1:]
    with pytest.raises(ValueError, match="batch_size"):
        PairLoader(table, TOK, batch_size=4, seed=1).load_state_dict(first.state_dict())


def test_pair_loader_with_nothing_short_enough():
    with pytest.raises(ValueError, match="0 of 1 pairs fit in --max-length 10"):
        PairLoader(pairs_table([("a", "b", "c")]), TOK, batch_size=2, max_length=10)


# ---- prompt loader ------------------------------------------------------------------------------

def test_prompts_are_left_padded_queries():
    table = pairs_table([("abc", "x", "y"), ("a", "x", "y")])
    batch = next(iter(PromptLoader(table, TOK, batch_size=2, seed=0)))
    rows = {TOK.question(t.tolist()): (t, m) for t, m in zip(batch.tokens, batch.attention_mask)}
    assert batch.tokens.shape == (2, 23)  # 20 + len("abc")
    assert rows["abc"][0].tolist() == [BOS] + TOK.encode("Question: abc\n\nAnswer:")
    assert rows["a"][0].tolist() == [PAD, PAD] + [BOS] + TOK.encode(format_prompt("a"))
    assert rows["a"][1].tolist() == [False, False] + [True] * 21
    assert batch.attention_mask.dtype == torch.bool


def test_prompt_length_limit_and_dedupe():
    table = pairs_table([("abc", "x", "y"), ("abc", "z", "y"), ("abcd", "x", "y"), ("abcde", "x", "y")])
    loader = PromptLoader(table, TOK, batch_size=1, max_length=24)  # keeps fewer than 24 tokens (abc: 23)
    assert [TOK.question(q) for q in loader.queries] == ["abc"] and loader.too_long == 2


def take_questions(loader, n):
    return [TOK.question(t.tolist()) for b in itertools.islice(iter(loader), n) for t in b.tokens]


def test_prompts_cycle_epochs_with_a_new_shuffle():
    table = pairs_table([(q, "x", "y") for q in "abcde"])
    stream = take_questions(PromptLoader(table, TOK, batch_size=2, seed=3), 10)  # 20 queries = 4 epochs
    epochs_ = [stream[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(e) == list("abcde") for e in epochs_)
    assert len({tuple(e) for e in epochs_}) > 1
    assert stream == take_questions(PromptLoader(table, TOK, batch_size=2, seed=3), 10)


def test_prompt_ranks_and_resume():
    table = pairs_table([(q, "x", "y") for q in "abcdefg"])
    shards = [set(take_questions(PromptLoader(table, TOK, batch_size=1, rank=r, world_size=2), 4)) for r in range(2)]
    assert shards[0] | shards[1] == set("abcdefg") and not shards[0] & shards[1]
    full = take_questions(PromptLoader(table, TOK, batch_size=3, seed=2), 6)
    first = PromptLoader(table, TOK, batch_size=3, seed=2)
    head = take_questions(first, 2)
    resumed = PromptLoader(table, TOK, batch_size=3, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert head + take_questions(resumed, 4) == full
    with pytest.raises(ValueError, match="rank_queries"):
        PromptLoader(pairs_table([("a", "x", "y")]), TOK, batch_size=3, seed=2).load_state_dict(first.state_dict())
