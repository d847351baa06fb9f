"""Critic-free advantage estimators, as pure functions of tensors (PPO's own, GAE, is in rlhf_math.py).

Each prompt is answered k times (a group); `scores` is [G, k], one reward-model score per response.
Sequence-level estimators return one advantage per response [G, k], which the loss applies to every
token of that response; REINFORCE++ returns per-token advantages [B, T].

- RLOO (Ahmadian et al. 2024, arXiv 2402.14740; Kool et al. 2019): the score minus the mean of the
  other k − 1 scores of the same prompt; the KL penalty is in the reward (summed over the response).
- GRPO (Shao et al. 2024, arXiv 2402.03300): the group-normalised score (score − mean) / (std + ε),
  with the KL as a separate loss term (the k3 estimator against the reference), not in the reward.
- Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): GRPO without the std division (which up-weights
  groups whose scores barely differ), and the loss summed over tokens and divided by a constant
  instead of by each response's length (engine/ppo.py applies that normalisation).
- REINFORCE++ (Hu 2025, arXiv 2501.03262): per-token KL in the reward, returns without a critic, and
  advantages whitened over the global batch.
- ReMax (Li et al. 2023, arXiv 2310.10505): the score minus the score of the greedy response to the
  same prompt.
"""
from __future__ import annotations

import torch

ESTIMATORS = ("ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp", "remax")
CRITIC_FREE = ESTIMATORS[1:]


def _groups(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 2 or scores.numel() == 0:
        raise ValueError(f"scores must be [groups, samples per prompt], got shape {list(scores.shape)}")
    return scores.float()


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """score_i − mean_{j≠i} score_j within each group [G, k] (= k/(k−1) · (score_i − group mean))."""
    scores = _groups(scores)
    k = scores.shape[1]
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (--samples-per-prompt >= 2): with one, the "
                         "leave-one-out baseline is undefined")
    others = (scores.sum(1, keepdim=True) - scores) / (k - 1)
    return scores - others


def grpo_advantages(scores: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(score − group mean) / (group std + eps) [G, k]; `scale` False is Dr. GRPO's unscaled version.
    The std is the sample (unbiased) one, as the GRPO reference implementations compute it."""
    scores = _groups(scores)
    if scores.shape[1] < 2:
        raise ValueError("GRPO needs at least 2 samples per prompt (--samples-per-prompt >= 2)")
    centred = scores - scores.mean(1, keepdim=True)
    return centred / (scores.std(1, keepdim=True) + eps) if scale else centred


def remax_advantages(scores: torch.Tensor, greedy_scores: torch.Tensor) -> torch.Tensor:
    """A response's total reward − the greedy response's to the same prompt (its score − β·Σ KL_t too, so
    both measure the same thing): scores [G, k], greedy_scores [G]."""
    scores = _groups(scores)
    if greedy_scores.shape != scores.shape[:1]:
        raise ValueError(f"one greedy score per prompt: {list(greedy_scores.shape)} for {scores.shape[0]} groups")
    return scores - greedy_scores.float()[:, None]


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = Σ_{s≥t} γ^{s−t} r_s over real tokens [B, T] (REINFORCE's return, no value baseline); 0 on padding."""
    rewards, m = rewards.float() * mask, mask.float()
    out, running = torch.zeros_like(rewards), torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * m[:, t + 1] if t + 1 < rewards.shape[1] else rewards[:, t]
        out[:, t] = running * m[:, t]
    return out


def k3_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, n_tokens=None) -> torch.Tensor:
    """GRPO's KL term: mean over real tokens of k3 = π_ref/π − log(π_ref/π) − 1 (unbiased, never negative),
    differentiable in `logprobs`; `n_tokens` overrides the local count (a global count across ranks)."""
    log_ratio = ref_logprobs.float() - logprobs.float()  # log(π_ref / π)
    k3 = (torch.expm1(log_ratio) - log_ratio) * mask
    count = mask.sum() if n_tokens is None else n_tokens
    return k3.sum() / torch.clamp(torch.as_tensor(count, dtype=k3.dtype, device=k3.device), min=1)
