"""The held-out questions that eval and evaluation during PPO answer: one per distinct question of a
pairs file, with its two human answers."""
from __future__ import annotations

from typing import NamedTuple

from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.data.tokenizer import format_prompt


class Question(NamedTuple):
    index: int  # position in the evaluation set: seeds and sharding derive from it
    text: str
    better: str  # response_j: the human answer voted better
    worse: str  # response_k


def load_questions(path: str, limit: int | None, tok=None, max_prompt_tokens: int | None = None) -> list[Question]:
    """One entry per distinct question (its first pair's two answers), in file order; with `tok`, only the
    questions whose prompt fits in `max_prompt_tokens` (an answer must fit in the context after it).
    The first `limit` of those."""
    table = read_pairs(path, columns=("question", "response_j", "response_k"))
    seen, out = set(), []
    for q, j, k in zip(*(table[c].to_pylist() for c in ("question", "response_j", "response_k"))):
        if q not in seen:
            seen.add(q)
            out.append(Question(len(out), q, j, k))
    if not out:
        raise ValueError(f"{path} has no questions to evaluate on")
    if tok is not None and max_prompt_tokens is not None:
        lengths = [len(ids) for ids in tok.encode_batch([format_prompt(q.text) for q in out], bos=True)]
        out = [q for q, n in zip(out, lengths) if n <= max_prompt_tokens]
        if not out:
            raise ValueError(f"{path}: no question's prompt fits in {max_prompt_tokens} tokens (the model's context "
                             "less the answer's length)")
    return out[:limit] if limit else out
