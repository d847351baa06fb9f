"""RM and PPO math on hand-computed numbers (the arithmetic is in the comments)."""
import math

import pytest
import torch

from rlhf_engine.engine.rl.rlhf_math import (adaptive_kl_coef, clipped_value_loss, explained_variance, full_kl, gae,
                                             kl_estimate, kl_penalized_rewards, last_token_index, masked_mean,
                                             masked_moments, masked_whiten, moments_to_stats, pairwise_loss,
                                             ppo_policy_loss, running_moments_update)

t = torch.tensor
close = lambda a, b, tol=1e-4: torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol)  # noqa


def test_pairwise_loss():
    # −log σ(2) = 0.12693, −log σ(0) = ln 2 = 0.69315; mean 0.41004. Accuracy 1/2, margin (2 + 0)/2.
    loss, stats = pairwise_loss(t([2.0, 0.0]), t([0.0, 0.0]))
    assert close(loss, 0.41004) and close(stats.accuracy, 0.5) and close(stats.margin, 1.0)


def test_masked_mean_and_whiten_ignore_padding():
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    assert close(masked_mean(x, mask), 2.0)
    # mean 2, unbiased variance ((1)² + 0 + (1)²) / 2 = 1 -> (-1, 0, 1), padding stays exactly 0.
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    assert masked_whiten(x, mask)[0, 3].item() == 0.0
    assert close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def test_moments_merge_like_one_batch():
    """Moments summed over two 'ranks' give the statistics of the union (the cross-rank whitening)."""
    a, b = t([[1.0, 2.0, 0.0]]), t([[3.0, 4.0, 5.0]])
    ma, mb = t([[1, 1, 0]]), t([[1, 1, 1]])
    mean, var = moments_to_stats(masked_moments(a, ma) + masked_moments(b, mb))
    assert close(mean, 3.0) and close(var, 2.5)  # statistics of [1, 2, 3, 4, 5]


def test_kl_estimators():
    # π = 0.5, π_ref = 0.25: log ratio ln 2 = 0.693147; k2 = ½ ln²2 = 0.240227; k3 = (0.5 − 1) + ln 2 = 0.193147.
    lp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert close(kl_estimate(lp, ref, "k1"), 0.693147)
    assert close(kl_estimate(lp, ref, "k2"), 0.240227)
    assert close(kl_estimate(lp, ref, "k3"), 0.193147)
    # The other way round k1 goes negative; k3 = (2 − 1) − ln 2 = 0.306853 stays positive.
    assert close(kl_estimate(ref, lp, "k1"), -0.693147)
    assert close(kl_estimate(ref, lp, "k3"), 0.306853)
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(lp, ref, "k4")


def test_full_kl_over_the_vocabulary():
    # p = (.5, .5), q = (.25, .75): .5 ln 2 + .5 ln(2/3) = 0.346574 − 0.202733 = 0.143841.
    logits, ref = torch.log(t([[0.5, 0.5]])), torch.log(t([[0.25, 0.75]]))
    assert close(full_kl(logits, ref), [0.143841])
    assert close(full_kl(ref, ref), [0.0])


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    scores = t([1.0, -2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards, stats = kl_penalized_rewards(scores, kl, mask, kl_coef=0.5)
    # Row 0: −0.5·KL = (−.05, −.1, −.15), score +1 on token 2. Row 1: (−.2, −.25 − 2, 0): padding is exactly 0.
    assert close(rewards, [[-0.05, -0.1, 0.85], [-0.2, -2.25, 0.0]])
    assert rewards[1, 2].item() == 0.0 and stats.kl[1, 2].item() == 0.0
    assert last_token_index(mask).tolist() == [2, 1]


def test_gae_by_hand():
    # γ = 1, λ = 0.5, V = .5 everywhere, reward 1 at the end:
    # δ2 = 1 + 0 − .5 = .5 -> A2 = .5; δ1 = 0 + .5 − .5 = 0 -> A1 = .25; A0 = .125. Returns = A + V.
    rewards, values = t([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]), t([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 1 ends at t=1 (V after it is 0): δ1 = 2 − 1 = 1 -> A1 = 1; δ0 = 0 + 1 − 1 = 0 -> A0 = .5; padding 0.
    assert close(adv, [[0.125, 0.25, 0.5], [0.5, 1.0, 0.0]])
    assert close(ret, [[0.625, 0.75, 1.0], [1.5, 2.0, 0.0]])


def test_ppo_policy_loss_by_hand():
    logp = torch.log(t([[1.5, 0.5, 7.0]]))
    old = t([[0.0, 0.0, 0.0]])
    adv = t([[1.0, -1.0, 5.0]])
    mask = t([[1, 1, 0]])  # the third token is padding with a wild ratio: it must not count
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # Token 0: ρ = 1.5, A = 1: max(−1.5, −1.2) = −1.2 (clipped). Token 1: ρ = .5, A = −1: max(.5, .8) = .8 (clipped).
    assert close(loss, (-1.2 + 0.8) / 2)
    assert close(stats.clipfrac, 1.0) and close(stats.ratio_mean, 1.0) and close(stats.ratio_max, 1.5)
    assert close(stats.approx_kl, 0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    # Normalised by a global token count of 4 instead of the local 2: half the loss.
    assert close(ppo_policy_loss(logp, old, adv, mask, clip=0.2, n_tokens=4)[0], (-1.2 + 0.8) / 4)


def test_ratio_one_gives_the_plain_policy_gradient():
    logp = torch.zeros(1, 3, requires_grad=True)
    adv, mask = t([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    loss, stats = ppo_policy_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert close(logp.grad, -adv / 3) and stats.clipfrac.item() == 0.0


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = t([[1.0, 2.0]]), t([[0.5, 2.0]]), t([[2.0, 1.0]]), t([[1, 1]])
    loss, stats = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # Token 0: V_clip = .5 + .2 = .7; max((1 − 2)², (.7 − 2)²) = 1.69. Token 1: max(1, 1) = 1. ½·mean = .6725.
    assert close(loss, 0.6725) and close(stats.clipfrac, 0.5)


def test_explained_variance():
    returns, mask = t([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert close(explained_variance(returns, returns, mask), 1.0)
    assert close(explained_variance(torch.zeros(1, 3) + 2.0, returns, mask), 0.0)


def test_adaptive_kl_controller():
    # KL 12 vs target 6: error clipped to +.2; β·(1 + .2·256/10000) = .2·1.00512.
    assert math.isclose(adaptive_kl_coef(0.2, 12.0, 256, target=6.0, horizon=10000), 0.201024)
    # KL 3 vs target 6: error −.5 clipped to −.2.
    assert math.isclose(adaptive_kl_coef(0.2, 3.0, 256, target=6.0, horizon=10000), 0.2 * (1 - 0.2 * 256 / 10000))


def test_running_moments_match_the_whole_sample():
    mean, var, n = running_moments_update(0.0, 0.0, 0, t([1.0, 2.0, 3.0]))
    mean, var, n = running_moments_update(mean, var, n, t([4.0, 5.0]))
    assert (n, round(mean, 6), round(var, 6)) == (5, 3.0, 2.0)  # population variance of 1..5


def test_shape_scores():
    from rlhf_engine.engine.rl.rlhf_math import shape_scores
    scores, ended = t([3.0, -1.0, 10.0]), t([True, True, False])
    # Baseline 1: (2, −2, 9); normalised by mean 0, var 4: (1, −1, 4.5); clipped to ±2: (1, −1, 2).
    assert close(shape_scores(scores, ended, baseline=1.0, norm=(0.0, 4.0), clip=2.0), [1.0, -1.0, 2.0])
    # A row without EOS gets the fixed penalty instead of its score.
    assert close(shape_scores(scores, ended, no_eos_penalty=-5.0), [3.0, -1.0, -5.0])


def test_combine_rewards_by_hand():
    from rlhf_engine.engine.rl.rlhf_math import combine_rewards
    members = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # 3 members x 2 rows
    assert torch.allclose(combine_rewards(members, "mean"), torch.tensor([2.0, 1.0]))
    assert torch.allclose(combine_rewards(members, "min"), torch.tensor([1.0, 0.0]))
    # population variance over members: row 0 (1, 3, 2) -> 2/3; row 1 (0, 0, 3) -> 2
    assert torch.allclose(combine_rewards(members, "uwo", 0.5), torch.tensor([2.0 - 1 / 3, 1.0 - 1.0]))
    with pytest.raises(ValueError, match="unknown reward ensemble 'max'"):
        combine_rewards(members, "max")
