"""The math of reward modelling and PPO, as pure functions of tensors.

Everything here takes tensors (and keyword floats) and returns tensors plus, where useful, a small
NamedTuple of statistics; nothing reads global state or talks to other processes. Shapes: B rows,
T response tokens; `mask` [B, T] is 1 on real response tokens (up to and including EOS) and 0 on
padding and prompt, and every per-token quantity is exactly 0 where the mask is 0.

Distributed callers reduce `masked_moments` across ranks themselves and pass the global numbers in
(`whiten(x, mask, mean, var)`, `n_tokens=`), so results do not depend on how the batch is split.

References: InstructGPT (Ouyang et al. 2022) pairwise loss; DPO (Rafailov et al. 2023), IPO (Azar et al.
2023); Ziegler et al. 2019 adaptive KL controller; Schulman et al. 2017 (PPO) clipped objectives; Schulman
et al. 2016 (GAE); J. Schulman, "Approximating KL divergence" (2020) for the k1/k2/k3 estimators; "The N
Implementation Details of RLHF with PPO" (Huang et al. 2023) and TRL's PPOTrainer for the value clipping
and whitening.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# ---- masked statistics --------------------------------------------------------------------------

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    x = x * mask  # padding contributes exactly zero (any finite value there is ignored)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, n_tokens=None) -> torch.Tensor:
    """Mean over real tokens; `n_tokens` overrides the local count (e.g. a global count across ranks)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    if n_tokens is not None:
        count = n_tokens
    return masked_sum(x, mask, dim) / torch.clamp(torch.as_tensor(count, dtype=x.dtype, device=x.device), min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, count] over real tokens, float64: all-reduce this, then `moments_to_stats`."""
    x, m = x.double(), mask.double()
    return torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])


def moments_to_stats(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) from summed moments."""
    s, ss, n = moments.unbind()
    mean = s / n.clamp(min=1)
    var = (ss - n * mean * mean) / (n - 1).clamp(min=1)
    return mean.float(), var.clamp(min=0).float()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, mean=None, var=None, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over real tokens (statistics of this batch unless given); 0 on padding."""
    if mean is None or var is None:
        mean, var = moments_to_stats(masked_moments(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---- reward model -------------------------------------------------------------------------------

class PairStats(NamedTuple):
    accuracy: torch.Tensor  # fraction of pairs with r_chosen > r_rejected
    margin: torch.Tensor  # mean r_chosen - r_rejected


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, PairStats]:
    """InstructGPT's reward-model loss −log σ(r_chosen − r_rejected), averaged over pairs [B]."""
    diff = chosen.float() - rejected.float()
    return -F.logsigmoid(diff).mean(), PairStats((diff > 0).float().mean(), diff.mean())


class DPOStats(NamedTuple):
    chosen_reward: torch.Tensor  # [B] β·(log π(y_w|x) − log π_ref(y_w|x)), detached: DPO's implicit reward
    rejected_reward: torch.Tensor  # [B] the same for the rejected answer y_l
    accuracy: torch.Tensor  # fraction of pairs whose chosen reward is the higher
    margin: torch.Tensor  # mean chosen − rejected reward


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None,
             rejected_tokens=None) -> tuple[torch.Tensor, DPOStats]:
    """DPO's loss averaged over B pairs, from each answer's summed log-probability [B] under the policy and
    the reference. With h = (log π_w − log π_ref,w) − (log π_l − log π_ref,l):
    sigmoid (Rafailov et al. 2023): −log σ(βh); with label smoothing ε (cDPO) −(1−ε) log σ(βh) − ε log σ(−βh).
    ipo (Azar et al. 2023, eq. 17): (h̄ − 1/(2β))², h̄ built from per-token mean log-ratios, the length
    normalisation TRL uses, so it needs each answer's token count (chosen_tokens, rejected_tokens [B])."""
    chosen_ratio, rejected_ratio = chosen.float() - ref_chosen.float(), rejected.float() - ref_rejected.float()
    if loss == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss == "ipo":
        h = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} (sigmoid or ipo)")
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses.mean(), DPOStats(chosen_reward, rejected_reward, (chosen_reward > rejected_reward).float().mean(),
                                   (chosen_reward - rejected_reward).mean())


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded mask [B, T] -> [B]."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


# ---- KL between policy and reference ------------------------------------------------------------

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from the sampled tokens' log-probs (samples drawn from π).

    k1 = log π − log π_ref: unbiased, but a single sample can be negative (StackLLaMA's k1).
    k2 = ½ (log π − log π_ref)²: biased, never negative.
    k3 = (r − 1) − log r with r = π_ref / π: unbiased and never negative.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; choose k1, k2 or k3 (the exact KL is full_kl)")


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_full: torch.Tensor,
                 estimator: str) -> torch.Tensor:
    """The per-token KL PPO penalises, [B, R]: the exact KL over the vocabulary (`kl_full`, computed in the
    rollout's forward) for estimator "full", else the sampled-token estimate k1, k2 or k3."""
    return kl_full if estimator == "full" else kl_estimate(logprobs, ref_logprobs, estimator)


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Exact per-token KL(π‖π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)) over the vocabulary. [.., V] -> [..]

    Never negative (up to round-off), whatever was sampled: the cure for negative-KL reward hacking.
    """
    return full_kl_from_log_softmax(F.log_softmax(logits.float() / temperature, -1),
                                    F.log_softmax(ref_logits.float() / temperature, -1))


def full_kl_from_log_softmax(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Σ_v π(v) (log π(v) − log π_ref(v)) from two log-softmax tensors [.., V] -> [..]. Not clamped:
    round-off can leave it a hair below 0 where π = π_ref, and tests check that it never goes further."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


class KLPenalty(NamedTuple):
    kl: torch.Tensor  # [B, T] per-token KL estimate (0 on padding)
    non_score_reward: torch.Tensor  # [B, T] −β·KL


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """Per-token rewards: −β·KL_t on every response token, plus the score on the last real token.

    scores [B], kl [B, T] (any estimator), mask [B, T] -> rewards [B, T] (exactly 0 on padding).
    """
    kl = kl * mask
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, KLPenalty(kl, non_score)


def combine_rewards(members: torch.Tensor, how: str = "mean", uwo_lambda: float = 1.0) -> torch.Tensor:
    """One score per row from an ensemble's scores members [M, B] (Coste et al., ICLR 2024): their mean,
    their min (worst case), or uwo, the mean less λ times their variance across members (population
    variance: members that disagree are penalised)."""
    if how == "mean":
        return members.mean(0)
    if how == "min":
        return members.min(0).values
    if how == "uwo":
        return members.mean(0) - uwo_lambda * members.var(0, unbiased=False)
    raise ValueError(f"unknown reward ensemble {how!r}; choose mean, min or uwo")


def adaptive_kl_coef(kl_coef: float, current_kl: float, n_steps: int, target: float, horizon: float) -> float:
    """Ziegler et al.'s proportional controller: move β so the measured KL tracks `target`."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


class RunningMoments(NamedTuple):
    mean: float = 0.0
    var: float = 0.0  # population variance
    count: float = 0


def running_moments_update(mean: float, var: float, count: float, x: torch.Tensor) -> RunningMoments:
    """Merge a batch x into running (mean, var, count) — Chan et al.'s parallel update — for reward
    normalisation."""
    n = x.numel()
    if n == 0:
        return RunningMoments(mean, var, count)
    b_mean, b_var = x.double().mean().item(), x.double().var(unbiased=False).item()
    total = count + n
    delta = b_mean - mean
    new_mean = mean + delta * n / total
    new_var = (var * count + b_var * n + delta * delta * count * n / total) / total
    return RunningMoments(new_mean, new_var, total)


# ---- advantages ---------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens. rewards, values, mask: [B, T].

    δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, where V after the last real token is 0,
    also for rows cut at the length cap (the StackLLaMA/TRL convention of treating the cap as the
    end). Returns (advantages, returns = A + V), both 0 on padding.
    """
    B, T = rewards.shape
    rewards, values, m = rewards.float(), values.float(), mask.float()
    last = last_token_index(mask)
    zero = torch.zeros(B, device=rewards.device)
    advantages = torch.zeros_like(rewards)
    next_adv = zero
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * m[:, t + 1] if t + 1 < T else zero
        next_value = torch.where(last == t, zero, next_value)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * m


# ---- PPO losses ---------------------------------------------------------------------------------

class PolicyStats(NamedTuple):
    clipfrac: torch.Tensor  # share of tokens where the clipped objective was the active one
    approx_kl: torch.Tensor  # ½ E[(log π − log π_old)²], the early-stopping signal
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2, n_tokens=None):
    """Clipped surrogate: mean over real tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old."""
    log_ratio = (logprobs.float() - old_logprobs.float()) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, n_tokens=n_tokens)
    with torch.no_grad():
        stats = PolicyStats(masked_mean((clipped > unclipped).float(), mask),
                            masked_mean(0.5 * log_ratio.pow(2), mask),
                            masked_mean(ratio, mask),
                            (ratio * mask).max())
    return loss, stats


class ValueStats(NamedTuple):
    clipfrac: torch.Tensor
    explained_variance: torch.Tensor  # 1 − Var(returns − V) / Var(returns)


def clipped_value_loss(values, old_values, returns, mask, clip: float = 0.2, n_tokens=None):
    """½ mean over real tokens of max((V − R)², (V_clipped − R)²), V_clipped = V_old ± clip."""
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns).pow(2)
    clipped_err = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask, n_tokens=n_tokens)
    with torch.no_grad():
        stats = ValueStats(masked_mean((clipped_err > unclipped_err).float(), mask),
                           explained_variance(values, returns, mask))
    return loss, stats


def explained_variance(values, returns, mask) -> torch.Tensor:
    _, var_returns = moments_to_stats(masked_moments(returns, mask))
    _, var_residual = moments_to_stats(masked_moments(returns - values, mask))
    return 1.0 - var_residual / var_returns.clamp(min=1e-8)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, baseline: float = 0.0, norm=None, clip: float = 0.0,
                 no_eos_penalty: float | None = None) -> torch.Tensor:
    """Reward-model scores -> the scalar rewards PPO uses, per row [B].

    score − baseline; then (if norm = (mean, var) of past scores) (score − mean) / std; then clipped to
    ±clip (0 = off). Rows cut at the length cap (ended False) get `no_eos_penalty` instead, if given.
    """
    shaped = scores.float() - baseline
    if norm is not None:
        mean, var = norm
        shaped = (shaped - mean) / max(var, 1e-8) ** 0.5
    if clip > 0:
        shaped = shaped.clamp(-clip, clip)
    if no_eos_penalty is not None:
        shaped = torch.where(ended, shaped, torch.full_like(shaped, no_eos_penalty))
    return shaped
