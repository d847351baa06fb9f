"""Answer scores, preference pairs and question-level splits: the rules that turn votes into data.

Score (Askell et al. 2021, section 4.1; used for StackLLaMA's stack-exchange-paired):
    score = round(log2(1 + votes)) + (1 if accepted else 0), and -1 for any answer with negative votes.
- `votes` is the dump's `Score`, the net vote count (up minus down).
- Negative votes give -1 flat, accepted or not: the paper assigns "a score of -1" to such answers.
- Zero votes: log2(1) = 0, so 0 (1 if accepted).
- Rounding ties cannot happen: log2(1 + v) = k + 1/2 would need 1 + v = 2**k * sqrt(2), which is
  irrational. We still avoid floats (and the question of Python's banker's `round()` versus half-up)
  by rounding exactly in integers: log2(n) >= k + 1/2  <=>  n**2 >= 2**(2k + 1).

Pairs: every two answers of one question whose scores differ, the better one as `response_j`; if a
question has more than `max_pairs` such pairs, a uniform sample of them, drawn from a seed made of
(seed, site, question id) so the choice does not depend on file order or on the other questions.

Splits are by question, never by pair, so no question's text is both trained on and evaluated on.
Each question's split comes from a hash of (seed, site, question text) compared with the cumulative
fractions: reproducible, order-independent, and streaming (no global shuffle). The defaults follow
stack-exchange-paired, whose finetune/reward/rl/evaluation parts hold about 3M/3M/3M/1.8M questions.
An optional `judge` split holds questions for a second reward model that PPO never optimises: the
held-out judge of `train.py eval` (a judge trained on the proxy's pairs would share its blind spots).
"""
from __future__ import annotations

import hashlib
import random
from typing import Sequence

SPLITS = ("finetune", "reward", "rl", "evaluation", "judge")  # judge: questions for a held-out judge RM
DEFAULT_SPLITS = ("finetune=0.28", "reward=0.28", "rl=0.28", "evaluation=0.16")


def askell_score(votes: int, accepted: bool) -> int:
    """The answer's preference score from its net votes and whether the asker accepted it."""
    if votes < 0:
        return -1
    n = votes + 1
    k = n.bit_length() - 1  # floor(log2 n)
    rounded = k + (n * n > 1 << (2 * k + 1))  # equality is impossible: an odd power of 2 is no square
    return rounded + int(accepted)


def stable_seed(*parts) -> int:
    """A 64-bit seed from ints and strings, equal across runs and machines (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def make_pairs(answers: Sequence[tuple[int, int]], max_pairs: int, seed: int) -> list[tuple[int, int]]:
    """(better id, worse id) pairs from (answer id, score) tuples; at most `max_pairs`, sampled from `seed`."""
    ordered = sorted(answers)  # canonical order, so the sample depends on the seed only
    candidates = [(a, b) if sa > sb else (b, a)
                  for i, (a, sa) in enumerate(ordered) for b, sb in ordered[i + 1:] if sa != sb]
    if len(candidates) > max_pairs:
        keep = sorted(random.Random(seed).sample(range(len(candidates)), max_pairs))
        candidates = [candidates[i] for i in keep]
    return candidates


def parse_splits(specs: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """("finetune=0.3", ...) -> (("finetune", 0.3), ...), checking names and that fractions sum to 1."""
    out = []
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            fraction = float(value) if sep else None
        except ValueError:
            fraction = None
        if fraction is None or not 0.0 < fraction <= 1.0:
            raise ValueError(f"split {spec!r} is not NAME=FRACTION with 0 < FRACTION <= 1")
        if name not in SPLITS:
            raise ValueError(f"split {spec!r}: the name must be one of {', '.join(SPLITS)}")
        if name in dict(out):
            raise ValueError(f"split {name!r} is given twice")
        out.append((name, fraction))
    if not out or abs(sum(f for _, f in out) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {', '.join(specs) or '(none)'} must sum to 1")
    return tuple(out)


def assign_split(splits: Sequence[tuple[str, float]], seed: int, site: str, question: int | str) -> str:
    """The split that `question` of `site` belongs to. prepare passes the question's text rather than its
    id, so the same question posted twice (or a generated site's repeated questions) never straddles two
    splits."""
    u = stable_seed("split", seed, site, question) / 2.0 ** 64  # uniform in [0, 1)
    cumulative = 0.0
    for name, fraction in splits:
        cumulative += fraction
        if u < cumulative:
            return name
    return splits[-1][0]  # u within float rounding of 1
