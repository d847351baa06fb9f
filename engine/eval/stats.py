"""Statistics for `train.py eval`: several arms (models, and the human answers from the data) answer the
same held-out questions, and one or more reward models ("judges") score every response.

Inputs are per-question arrays (numpy arrays, nested lists or CPU tensors): `[Q]` for one response per
question, `[Q, k]` for k samples per question. Each function is pure and returns a NamedTuple.

Conventions (each pinned by a test in tests/test_eval_stats.py):
- The question is the unit of resampling. The k samples of one question share its prompt and its
  difficulty, so they move together; resampling responses as if they were independent would make an
  interval up to sqrt(k) too narrow. Each question contributes the mean of its k values, so every
  question weighs the same (with equal k this is also the mean over all responses).
- A win rate compares every arm sample with every baseline sample of the same question (k_arm * k_base
  comparisons, a per-question Mann-Whitney count). It estimates P(a random arm response beats a random
  baseline response to the same question), the same quantity whatever k is; comparing per-question
  means instead would drift towards 0 or 1 as k grows. A win counts 1, a tie (|score difference| <=
  `tie_margin`) 1/2, a loss 0. Paired: a resampled question brings both arms' responses with it.
- Length control follows AlpacaEval-LC: fit P(win) = sigma(a + b * dlen / s) to the comparisons
  (ties as target 1/2; logistic regression accepts fractional targets) and report sigma(a), the win
  probability at zero length difference. s is the spread of dlen, for conditioning only; dlen is not
  centred, because centring would move sigma(a) back to the win rate at the *average* length gap.

References: Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), percentile intervals;
Dubois et al. 2024, "Length-Controlled AlpacaEval" (arXiv:2404.04475); Gao et al. 2023, "Scaling Laws
for Reward Model Overoptimization" (proxy vs held-out judge); Mann & Whitney 1947.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

_CHUNK_ELEMENTS = 1 << 21  # bootstrap draws are made in chunks of about this many elements (memory bound)


class MeanInterval(NamedTuple):
    mean: float  # mean over questions of each question's mean value
    low: float  # percentile-bootstrap interval over questions
    high: float


class WinRate(NamedTuple):
    rate: float  # (wins + ties / 2) / n
    wins: int  # counts of comparisons (k_arm * k_base per question)
    ties: int
    losses: int
    n: int


class RateInterval(NamedTuple):
    rate: float
    low: float  # percentile-bootstrap interval over questions (paired: both arms move together)
    high: float


class LengthControlledWinRate(NamedTuple):
    rate: float  # sigma(intercept): estimated win rate at zero length difference
    low: float  # percentile-bootstrap interval over questions
    high: float
    intercept: float  # a in P(win) = sigma(a + b * dlen / length_scale)
    slope: float  # b: change in log-odds of winning per `length_scale` extra tokens
    length_scale: float  # standard deviation of dlen over all comparisons (1 when dlen is constant)


class LengthBuckets(NamedTuple):
    shorter: WinRate  # comparisons where the arm's response is shorter than the baseline's
    about_equal: WinRate  # |dlen| <= equal_within * baseline length
    longer: WinRate
    arm_mean_length: float  # mean over questions of the per-question mean length
    base_mean_length: float


class ProxyJudgeGap(NamedTuple):
    proxy: float  # win rate under the reward model the arm was optimised against
    judge: float  # win rate under a held-out judge, same arm, same baseline, same questions
    gap: float  # proxy - judge: large and growing over training is the over-optimisation signal


# ---- input checks and resampling -----------------------------------------------------------------

def _per_question(name: str, values) -> np.ndarray:
    """values as float64 [Q, k] (a [Q] input becomes [Q, 1]), with a clear error for bad input."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except ValueError as e:  # ragged lists
        raise ValueError(f"{name} must be a rectangular [questions] or [questions, samples] array: {e}") from e
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [questions] or [questions, samples], got {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}): need at least one question with one sample")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _paired(arm_scores, base_scores) -> tuple[np.ndarray, np.ndarray]:
    arm, base = _per_question("arm_scores", arm_scores), _per_question("base_scores", base_scores)
    if len(arm) != len(base):
        raise ValueError(f"arm_scores has {len(arm)} questions but base_scores has {len(base)}: "
                         "a paired comparison needs both arms to answer the same questions")
    return arm, base


def _lengths_like(name: str, lengths, scores: np.ndarray) -> np.ndarray:
    x = _per_question(name, lengths)
    if x.shape != scores.shape:
        raise ValueError(f"{name} has shape {x.shape} but its scores have shape {scores.shape}: "
                         "give one length per scored response")
    return x


def _check_bootstrap(n_boot: int, level: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _resampled_questions(n_questions: int, n_boot: int, seed: int, per_question: int = 1):
    """Bootstrap draws of question indices, yielded as [b, Q] chunks whose b's add up to n_boot."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // (n_questions * per_question))
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n_questions, size=(min(chunk, n_boot - start), n_questions))


def _percentiles(replicates: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _bootstrap_question_means(per_question: np.ndarray, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    _check_bootstrap(n_boot, level)
    means = [per_question[idx].mean(axis=1) for idx in _resampled_questions(len(per_question), n_boot, seed)]
    return _percentiles(np.concatenate(means), level)


# ---- means and win rates --------------------------------------------------------------------------

def bootstrap_mean(values_by_question, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> MeanInterval:
    """Mean of a per-response value ([Q] or [Q, k]) with a percentile-bootstrap interval over questions."""
    per_question = _per_question("values_by_question", values_by_question).mean(axis=1)
    low, high = _bootstrap_question_means(per_question, n_boot, seed, level)
    return MeanInterval(float(per_question.mean()), low, high)


def _outcomes(arm: np.ndarray, base: np.ndarray, tie_margin: float) -> np.ndarray:
    """[Q, k_arm * k_base] outcomes of every arm sample against every baseline sample: 1, 1/2 or 0."""
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    diff = arm[:, :, None] - base[:, None, :]  # [Q, k_arm, k_base]
    outcome = np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))
    return outcome.reshape(len(arm), -1)


def _count(outcomes: np.ndarray) -> WinRate:
    wins, ties, losses = (int((outcomes == v).sum()) for v in (1.0, 0.5, 0.0))
    n = wins + ties + losses
    return WinRate((wins + 0.5 * ties) / n if n else float("nan"), wins, ties, losses, n)


def win_rate(arm_scores, base_scores, tie_margin: float = 0.0) -> WinRate:
    """Share of (arm, baseline) response pairs of the same question that the arm wins, ties counting 1/2."""
    arm, base = _paired(arm_scores, base_scores)
    # Every question has the same number of comparisons, so this pooled rate is also the mean of the
    # per-question rates, which is what bootstrap_win_rate resamples.
    return _count(_outcomes(arm, base, tie_margin))


def bootstrap_win_rate(arm_scores, base_scores, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                       tie_margin: float = 0.0) -> RateInterval:
    """`win_rate` with a paired percentile-bootstrap interval that resamples questions."""
    arm, base = _paired(arm_scores, base_scores)
    per_question = _outcomes(arm, base, tie_margin).mean(axis=1)  # [Q] win fraction of each question
    low, high = _bootstrap_question_means(per_question, n_boot, seed, level)
    return RateInterval(float(per_question.mean()), low, high)


# ---- length ---------------------------------------------------------------------------------------

def _length_deltas(arm, base, arm_lengths, base_lengths) -> tuple[np.ndarray, np.ndarray]:
    """([Q, k_arm * k_base] arm length - baseline length, [Q, k_arm * k_base] baseline length)."""
    arm_len, base_len = _lengths_like("arm_lengths", arm_lengths, arm), _lengths_like("base_lengths", base_lengths, base)
    delta = arm_len[:, :, None] - base_len[:, None, :]  # [Q, k_arm, k_base], same order as _outcomes
    return delta.reshape(len(arm), -1), np.broadcast_to(base_len[:, None, :], delta.shape).reshape(len(arm), -1)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigma(z) without overflow in exp


def _fit_logistic(x: np.ndarray, y: np.ndarray, slope_l2: float = 1e-4, max_iter: int = 100):
    """Newton's method for P(y = 1) = sigma(a + b * x) by mean cross-entropy, one fit per row of x, y [B, N].

    y may be fractional (ties are 1/2). The small ridge on b keeps the 2x2 Hessian invertible when x is
    constant (a model against itself) or separates the outcomes; b is O(1) here, so its bias is ~1e-4."""
    a, b = np.zeros(len(x)), np.zeros(len(x))
    for _ in range(max_iter):
        p = _sigmoid(a[:, None] + b[:, None] * x)
        w, r = p * (1 - p), y - p
        g_a, g_b = r.mean(1), (r * x).mean(1) - slope_l2 * b  # gradient of the mean log-likelihood
        h_aa, h_ab, h_bb = w.mean(1) + 1e-12, (w * x).mean(1), (w * x * x).mean(1) + slope_l2
        det = h_aa * h_bb - h_ab * h_ab  # > 0 by Cauchy-Schwarz plus the ridges
        # Clipped Newton step: full steps near the optimum, bounded ones far from it.
        step_a = np.clip((h_bb * g_a - h_ab * g_b) / det, -5, 5)
        step_b = np.clip((h_aa * g_b - h_ab * g_a) / det, -5, 5)
        a, b = a + step_a, b + step_b
        if max(np.abs(step_a).max(), np.abs(step_b).max()) < 1e-10:
            break
    return a, b


def length_controlled_win_rate(arm_scores, base_scores, arm_lengths, base_lengths, n_boot: int = 2000,
                               seed: int = 0, level: float = 0.95, tie_margin: float = 0.0) -> LengthControlledWinRate:
    """AlpacaEval-LC style win rate: sigma(a) of P(win) = sigma(a + b * dlen / s), with a bootstrap interval.

    Lengths (tokens) have the same shapes as their scores. Unlike AlpacaEval we use dlen / s, not
    tanh(dlen / s): when the arm is longer in most comparisons tanh flattens the large gaps the slope is
    learned from. Simulated equal quality, judge rewarding length, dlen ~ N(2s, s): sigma(a) averaged 0.46
    (linear) vs 0.38 (tanh) against a truth of 0.5. Both extrapolate when dlen is rarely near 0; check
    `win_rate_by_length_bucket` for how many comparisons are about equally long."""
    _check_bootstrap(n_boot, level)
    arm, base = _paired(arm_scores, base_scores)
    outcome = _outcomes(arm, base, tie_margin)  # [Q, C]
    delta, _ = _length_deltas(arm, base, arm_lengths, base_lengths)  # [Q, C]
    scale = float(delta.std()) or 1.0
    x = delta / scale
    (a,), (b,) = _fit_logistic(x.reshape(1, -1), outcome.reshape(1, -1))
    n_questions, n_comparisons = outcome.shape
    replicates = []
    for idx in _resampled_questions(n_questions, n_boot, seed, n_comparisons):  # idx [b, Q]
        boot_a, _ = _fit_logistic(x[idx].reshape(len(idx), -1), outcome[idx].reshape(len(idx), -1))
        replicates.append(_sigmoid(boot_a))
    low, high = _percentiles(np.concatenate(replicates), level)
    return LengthControlledWinRate(float(_sigmoid(a)), low, high, float(a), float(b), scale)


def win_rate_by_length_bucket(arm_scores, base_scores, arm_lengths, base_lengths, equal_within: float = 0.1,
                              tie_margin: float = 0.0) -> LengthBuckets:
    """Win rates among comparisons where the arm is shorter, about as long (|dlen| <= equal_within * the
    baseline's length), or longer; pooled over comparisons, so a bucket may hold few questions."""
    if equal_within < 0:
        raise ValueError(f"equal_within must be >= 0, got {equal_within}")
    arm, base = _paired(arm_scores, base_scores)
    outcome = _outcomes(arm, base, tie_margin)
    delta, base_len = _length_deltas(arm, base, arm_lengths, base_lengths)
    equal = np.abs(delta) <= equal_within * np.abs(base_len)
    return LengthBuckets(
        shorter=_count(outcome[(delta < 0) & ~equal]),
        about_equal=_count(outcome[equal]),
        longer=_count(outcome[(delta > 0) & ~equal]),
        arm_mean_length=float(np.asarray(arm_lengths, dtype=np.float64).reshape(len(arm), -1).mean()),
        base_mean_length=float(np.asarray(base_lengths, dtype=np.float64).reshape(len(base), -1).mean()),
    )


# ---- over-optimisation ----------------------------------------------------------------------------

def proxy_judge_gap(proxy_win_rate: float, judge_win_rate: float) -> ProxyJudgeGap:
    """Proxy-reward win rate minus held-out-judge win rate for one arm against one baseline.

    Win rates rather than mean scores: two reward models' scores live on unrelated scales, while both win
    rates are probabilities against the same baseline, so their difference means something."""
    for name, rate in (("proxy_win_rate", proxy_win_rate), ("judge_win_rate", judge_win_rate)):
        if not 0 <= rate <= 1:
            raise ValueError(f"{name} must be a win rate in [0, 1], got {rate}")
    return ProxyJudgeGap(float(proxy_win_rate), float(judge_win_rate), float(proxy_win_rate - judge_win_rate))
