"""Evaluation statistics on hand-computed examples (the arithmetic is in the comments), plus simulations
with a known truth: interval coverage, length control on a length-loving judge, model-vs-itself."""
import math

import numpy as np
import pytest
import torch

from rlhf_engine.engine.eval.stats import (bootstrap_mean, bootstrap_win_rate, length_controlled_win_rate,
                                           proxy_judge_gap, win_rate, win_rate_by_length_bucket)


def test_win_rate_counts_ties_as_half():
    # Per question: 3>1 win, 1=1 tie, 2<4 loss, 5=5 tie, 7>0 win -> 2 wins, 2 ties, 1 loss; (2 + 2/2) / 5 = 0.6.
    result = win_rate([3, 1, 2, 5, 7], [1, 1, 4, 5, 0])
    assert tuple(result) == (0.6, 2, 2, 1, 5)
    # Within tie_margin 0.1 a 1.05-vs-1.0 win becomes a tie: (0 + 1/2) / 1.
    assert win_rate([1.05], [1.0]).rate == 1.0
    assert tuple(win_rate([1.05], [1.0], tie_margin=0.1)) == (0.5, 0, 1, 0, 1)


def test_k_samples_compare_every_pair_of_the_same_question():
    # One question, arm samples (10, 5), baseline samples (4, 6). Every pair: 10>4, 10>6, 5>4 win, 5<6 loss
    # -> 3/4. (Per-question means 7.5 vs 5 would say 1.0; sample i vs sample i, 10>4 and 5<6, 0.5.)
    assert tuple(win_rate([[10.0, 5.0]], [[4.0, 6.0]])) == (0.75, 3, 0, 1, 4)
    # k may differ between arms (a model's 2 samples against the one human answer): q1 3>2 win, 1<2 loss;
    # q2 2=2, 2=2 ties -> 1 win, 2 ties, 1 loss, (1 + 1) / 4 = 0.5. A [Q] input is [Q, 1]; tensors work.
    assert tuple(win_rate(torch.tensor([[3.0, 1.0], [2.0, 2.0]]), torch.tensor([2.0, 2.0]))) == (0.5, 1, 2, 1, 4)
    # Questions weigh equally: q1 per-pair rate 3/4, q2 all ties 1/2 -> bootstrap point (3/4 + 1/2) / 2.
    assert bootstrap_win_rate([[10, 5], [1, 1]], [[4, 6], [1, 1]], n_boot=10).rate == 0.625


def test_bootstrap_resamples_questions_not_responses():
    # One question with samples (0, 1): every resample is that question, mean 1/2, so the interval is a
    # point. Resampling the two responses instead would draw (0, 0) or (1, 1) a quarter of the time each.
    assert tuple(bootstrap_mean([[0.0, 1.0]], n_boot=200)) == (0.5, 0.5, 0.5)
    # 200 questions whose two samples are identical carry 200 values' worth of information, not 400:
    # the question-level interval is sqrt(2) = 1.41 times as wide as a bootstrap of the 400 flattened values.
    values = np.random.default_rng(0).normal(size=200)
    by_question = bootstrap_mean(np.stack([values, values], axis=1), n_boot=1000)
    as_responses = bootstrap_mean(np.concatenate([values, values]), n_boot=1000)
    assert by_question.mean == pytest.approx(as_responses.mean)
    ratio = (by_question.high - by_question.low) / (as_responses.high - as_responses.low)
    assert 1.25 < ratio < 1.6


def test_bootstrap_win_rate_is_paired():
    # The arm beats the baseline by 0.1 on every question while the baseline's scores span 0..99. Moving
    # each question's two responses together, every resample is all wins: the interval is the point 1.
    # Resampling the arms' questions independently would pair a low arm score with a high baseline one.
    base = np.arange(100.0)
    assert tuple(bootstrap_win_rate(base + 0.1, base, n_boot=300)) == (1.0, 1.0, 1.0)


def test_win_rate_interval_covers_the_truth_95_percent_of_the_time():
    # Questions differ in how much better the arm is (g ~ N(0.3, 1)), and each arm draws 2 samples with
    # N(0, 0.5²) noise, so a question's 4 comparisons are correlated. True win rate:
    # P(g + e_arm - e_base > 0) = Phi(0.3 / sqrt(1 + 0.5² + 0.5²)) = Phi(0.2449) = 0.5967.
    truth = 0.5 * (1 + math.erf(0.3 / math.sqrt(1.5) / math.sqrt(2)))
    rng = np.random.default_rng(0)
    covered = 0
    for seed in range(300):
        gap = rng.normal(0.3, 1.0, size=(100, 1))
        arm, base = gap + rng.normal(0, 0.5, size=(100, 2)), rng.normal(0, 0.5, size=(100, 2))
        result = bootstrap_win_rate(arm, base, n_boot=500, seed=seed)
        covered += result.low <= truth <= result.high
    assert 0.90 <= covered / 300 <= 0.99


def _length_loving_judge(quality_gap, mean_extra_length, n_questions=1000, seed=0):
    """Scores = quality + 0.02 * length + nothing else; arm quality is N(quality_gap, 1), baseline N(0, 1)."""
    rng = np.random.default_rng(seed)
    base_len = rng.normal(200, 50, n_questions)
    arm_len = rng.normal(200, 50, n_questions) + rng.normal(mean_extra_length, 60, n_questions)
    arm = rng.normal(quality_gap, 1, n_questions) + 0.02 * arm_len
    base = rng.normal(0, 1, n_questions) + 0.02 * base_len
    return arm, base, arm_len, base_len


def test_length_control_removes_a_length_preference():
    # Equal quality, the arm ~60 tokens longer, a judge that pays 0.02 per token: the raw win rate is
    # well above 1/2, but at equal length the arm wins half the time.
    arm, base, arm_len, base_len = _length_loving_judge(quality_gap=0.0, mean_extra_length=60)
    raw = win_rate(arm, base).rate
    lc = length_controlled_win_rate(arm, base, arm_len, base_len, n_boot=200)
    assert raw > 0.65
    assert abs(lc.rate - 0.5) < 0.08 and lc.low < 0.5 < lc.high
    assert lc.slope > 0.5  # longer wins: positive log-odds per standard deviation of dlen
    buckets = win_rate_by_length_bucket(arm, base, arm_len, base_len)
    assert buckets.longer.rate > 0.6 > 0.4 > buckets.shorter.rate
    assert buckets.arm_mean_length - buckets.base_mean_length > 40


def test_length_control_keeps_a_real_quality_gain():
    # Same length distribution for both arms, arm quality +0.8: at equal length the arm wins
    # P(0.8 + e1 - e2 > 0) = Phi(0.8 / sqrt 2) = 0.7142, and length control must not remove that.
    arm, base, arm_len, base_len = _length_loving_judge(quality_gap=0.8, mean_extra_length=0)
    lc = length_controlled_win_rate(arm, base, arm_len, base_len, n_boot=200)
    assert abs(lc.rate - 0.7142) < 0.05 and lc.low > 0.6


def test_a_model_against_itself_wins_exactly_half():
    scores, lengths = np.array([1.0, -2.0, 0.5]), np.array([10.0, 30.0, 20.0])
    assert tuple(win_rate(scores, scores)) == (0.5, 0, 3, 0, 3)  # all ties
    # All targets 1/2 and dlen 0: the fit stays at a = 0 and every resample too.
    lc = length_controlled_win_rate(scores, scores, lengths, lengths, n_boot=50)
    assert (lc.rate, lc.low, lc.high, lc.slope) == (0.5, 0.5, 0.5, 0.0)
    # With k = 3 samples, sample i vs sample j != i is not a tie, but every win (i, j) has its loss (j, i):
    # 3 ties on the diagonal, 3 wins, 3 losses per question; the outcomes are antisymmetric in dlen, so a = 0.
    rng = np.random.default_rng(0)
    scores, lengths = rng.normal(size=(20, 3)), rng.integers(5, 50, size=(20, 3))
    result = win_rate(scores, scores)
    assert result.rate == 0.5 and result.wins == result.losses == result.ties == 60
    assert length_controlled_win_rate(scores, scores, lengths, lengths, n_boot=20).rate == pytest.approx(0.5, abs=1e-9)


def test_win_rate_by_length_bucket_by_hand():
    # dlen = (50-100, 100-100, 102-100, 300-100) = (-50, 0, 2, 200); "about equal" is |dlen| <= 10% of 100.
    # shorter: q1 2>1 win -> 1.0. about equal: q2 0<1 loss, q3 1=1 tie -> (0 + 1/2) / 2. longer: q4 win.
    buckets = win_rate_by_length_bucket([2, 0, 1, 3], [1, 1, 1, 0], [50, 100, 102, 300], [100, 100, 100, 100])
    assert tuple(buckets.shorter) == (1.0, 1, 0, 0, 1)
    assert tuple(buckets.about_equal) == (0.25, 0, 1, 1, 2)
    assert tuple(buckets.longer) == (1.0, 1, 0, 0, 1)
    assert (buckets.arm_mean_length, buckets.base_mean_length) == ((50 + 100 + 102 + 300) / 4, 100.0)
    # An empty bucket says so (n 0, rate nan) rather than reporting 0.
    none_shorter = win_rate_by_length_bucket([1.0], [0.0], [200], [100]).shorter
    assert none_shorter.n == 0 and math.isnan(none_shorter.rate)


def test_bootstrap_mean_per_arm():
    # KL per response summed over tokens; per-question means (1+3)/2, 2, 3, 6 -> mean (2 + 2 + 3 + 6) / 4 = 3.25.
    kl = {"ppo": [[1.0, 3.0], [2.0, 2.0], [3.0, 3.0], [6.0, 6.0]], "sft": [0.0, 0.0, 0.0, 0.0]}
    result = {arm: bootstrap_mean(values, n_boot=400) for arm, values in kl.items()}
    assert result["ppo"].mean == 3.25 and 2.0 <= result["ppo"].low < 3.25 < result["ppo"].high <= 6.0
    assert result["ppo"] == bootstrap_mean(kl["ppo"], n_boot=400)  # same seed, same resamples
    assert tuple(result["sft"]) == (0.0, 0.0, 0.0)


def test_proxy_judge_gap():
    # The policy beats SFT 80% of the time by its own reward model but 55% by a held-out judge: 0.25 gap.
    assert proxy_judge_gap(0.8, 0.55) == pytest.approx((0.8, 0.55, 0.25))


@pytest.mark.parametrize("call, message", [
    (lambda: win_rate([1, 2, 3], [1, 2]), "arm_scores has 3 questions but base_scores has 2"),
    (lambda: win_rate([], []), "arm_scores is empty"),
    (lambda: bootstrap_mean(np.zeros((3, 0))), "values_by_question is empty"),
    (lambda: bootstrap_mean(np.zeros((2, 2, 2))), r"must have shape \[questions\] or \[questions, samples\]"),
    (lambda: bootstrap_mean([[1.0, 2.0], [3.0]]), "must be a rectangular"),
    (lambda: bootstrap_mean([1.0, float("nan")]), "contains NaN or inf"),
    (lambda: bootstrap_mean([1.0], n_boot=0), "n_boot must be a positive integer"),
    (lambda: bootstrap_win_rate([1.0], [0.0], level=95), r"level must be in \(0, 1\)"),
    (lambda: length_controlled_win_rate([[1, 2]], [[0, 0]], [[5]], [[5, 5]]), "arm_lengths has shape"),
    (lambda: win_rate([1.0], [0.0], tie_margin=-1), "tie_margin must be >= 0"),
    (lambda: proxy_judge_gap(1.2, 0.5), r"proxy_win_rate must be a win rate in \[0, 1\]"),
])
def test_bad_input_says_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
