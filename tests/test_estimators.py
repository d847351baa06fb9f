"""Critic-free advantage estimators on hand-computed groups."""
import math

import pytest
import torch

from rlhf_engine.engine.rl.estimators import (grpo_advantages, k3_kl_loss, remax_advantages, returns_to_go,
                                              rloo_advantages)
from rlhf_engine.engine.rl.rlhf_math import kl_estimate


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-5):
    return torch.allclose(a, t(b), atol=tol)


def test_rloo_by_hand():
    # Group [1, 2, 3]: the others' means are 2.5, 2, 1.5, so the advantages are −1.5, 0, 1.5.
    assert close(rloo_advantages(t([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])), [[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]])
    # k = 2: each sample's baseline is the other sample.
    assert close(rloo_advantages(t([[0.0, 1.0]])), [[-1.0, 1.0]])


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_advantages(t([[1.0], [2.0]]))


def test_grpo_and_dr_grpo_by_hand():
    # [1, 2, 3]: mean 2, sample std 1, so (−1, 0, 1) / (1 + 1e-4); Dr. GRPO keeps (−1, 0, 1).
    scores = t([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]])
    assert close(grpo_advantages(scores), [[-1 / 1.0001, 0.0, 1 / 1.0001], [0.0, 0.0, 0.0]])
    assert close(grpo_advantages(scores, scale=False), [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # [0, 10]: std 7.071; GRPO scales a small and a large spread to the same ±0.707, Dr. GRPO does not.
    assert close(grpo_advantages(t([[0.0, 10.0]])), [[-0.70710, 0.70710]], tol=1e-4)
    assert close(grpo_advantages(t([[0.0, 0.1]])), [[-0.70611, 0.70611]], tol=1e-4)  # 0.05 / (0.07071 + 1e-4)


def test_remax_by_hand():
    assert close(remax_advantages(t([[1.0, 3.0], [0.0, 0.0]]), t([2.0, -1.0])), [[-1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="one greedy score per prompt"):
        remax_advantages(t([[1.0, 3.0]]), t([2.0, 1.0]))


def test_returns_to_go_by_hand():
    mask = t([[1, 1, 1], [1, 1, 0]])
    rewards = t([[1.0, 0.0, 2.0], [1.0, 2.0, 9.0]])  # the 9 sits on padding
    assert close(returns_to_go(rewards, mask), [[3.0, 2.0, 2.0], [3.0, 2.0, 0.0]])
    # γ = 0.5: G2 = 2, G1 = 0 + 0.5·2 = 1, G0 = 1 + 0.5·1 = 1.5.
    assert close(returns_to_go(rewards, mask, gamma=0.5)[0], [1.5, 1.0, 2.0])


def test_grpo_kl_loss_is_the_k3_estimator():
    # π = 0.5, π_ref = 0.25: k3 = r − 1 − log r with r = π_ref/π = 0.5: 0.5 − 1 + 0.693147 = 0.193147.
    logp, ref = t([[math.log(0.5), math.log(0.5)]]), t([[math.log(0.25), math.log(0.5)]])
    mask = t([[1.0, 1.0]])
    assert k3_kl_loss(logp, ref, mask).item() == pytest.approx((0.193147 + 0.0) / 2, abs=1e-6)
    assert torch.allclose(k3_kl_loss(logp, ref, mask), (kl_estimate(logp, ref, "k3") * mask).sum() / 2)
    logp.requires_grad_(True)
    k3_kl_loss(logp, ref, mask).backward()  # d/dlogπ of (e^{ref−logπ} − (ref−logπ) − 1) = 1 − π_ref/π
    assert close(logp.grad, [[(1 - 0.5) / 2, 0.0]])


def test_bad_shapes():
    with pytest.raises(ValueError, match="groups, samples per prompt"):
        grpo_advantages(t([1.0, 2.0]))
