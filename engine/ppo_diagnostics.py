"""PPO diagnostics the anchors lack: reward and length statistics split by how responses ended,
negative-KL tokens by token type, a sample table, and warnings for the known failure modes
(negative mean KL; reward rising while response diversity collapses, the blog's "```" hack).

All statistics are over the global batch (ranks reduce their sums); only rank 0 writes them.
"""
from __future__ import annotations

import torch

from engine.dist import Dist, all_gather_objects, all_reduce_max, all_reduce_sum
from engine.rollout import token_kind

KINDS = ("word", "punctuation", "whitespace", "digit", "special/byte")


def reward_stats(dist: Dist, raw: torch.Tensor, shaped: torch.Tensor, ended: torch.Tensor) -> dict:
    raw, shaped, e = raw.double(), shaped.double(), ended.double()
    s = all_reduce_sum(dist, torch.stack([raw.sum(), (raw * raw).sum(), torch.tensor(float(raw.numel()),
                                          dtype=torch.float64, device=raw.device), shaped.sum(), (raw * e).sum(),
                                          e.sum(), (raw * (1 - e)).sum(), (1 - e).sum()]))
    n = s[2].clamp(min=1)
    mean = s[0] / n
    scores = torch.cat([torch.as_tensor(x) for x in all_gather_objects(dist, raw.cpu())])
    return {"env/reward_mean": mean.item(), "env/reward_std": ((s[1] / n - mean ** 2).clamp(min=0) ** 0.5).item(),
            "env/reward_min": scores.min().item(), "env/reward_max": scores.max().item(),
            "env/shaped_reward_mean": (s[3] / n).item(),
            "env/reward_mean_ended": (s[4] / s[5]).item() if s[5] > 0 else float("nan"),
            "env/reward_mean_truncated": (s[6] / s[7]).item() if s[7] > 0 else float("nan"),
            "env/reward_dist": scores}


def length_stats(dist: Dist, lengths: torch.Tensor, ended: torch.Tensor) -> dict:
    s = all_reduce_sum(dist, torch.stack([lengths.double().sum(), torch.tensor(float(lengths.numel()),
                                          dtype=torch.float64, device=lengths.device), ended.double().sum()]))
    return {"env/response_length_mean": (s[0] / s[1]).item(),
            "env/response_length_min": -all_reduce_max(dist, -lengths.min().double()).item(),
            "env/response_length_max": all_reduce_max(dist, lengths.max().double()).item(),
            "env/eos_fraction": (s[2] / s[1]).item()}


def negative_kl_stats(dist: Dist, log_ratio: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, tok) -> dict:
    """How many response tokens have log π − log π_ref < 0 (k1 negative), and their share by token type."""
    neg = (log_ratio < 0) & mask.bool()
    counts = torch.zeros(len(KINDS) + 1, dtype=torch.float64, device=tokens.device)
    for token in tokens[neg].tolist():
        counts[KINDS.index(token_kind(tok.sp.IdToPiece(int(token))))] += 1
    counts[-1] = mask.sum()
    counts = all_reduce_sum(dist, counts)
    total_neg = counts[:-1].sum()
    out = {"objective/negative_kl_tokens": total_neg.item(),
           "objective/negative_kl_share": (total_neg / counts[-1].clamp(min=1)).item()}
    for i, kind in enumerate(KINDS):
        out[f"objective/negative_kl_by_type/{kind.replace('/', '_')}"] = (counts[i] / total_neg.clamp(min=1)).item()
    return out


def warnings(log, step: int, metrics: dict, history: list[dict], window: int = 5, tolerance: float = 1e-2) -> None:
    """Warn about the known failure modes. `tolerance` (nats per response) keeps the rounding noise of
    a policy still equal to its reference (k1 ≈ ±1e-7) from raising the negative-KL alarm."""
    if metrics["objective/kl_k1"] < -tolerance:
        log.warn(f"ppo: step {step}: mean k1 KL is negative ({metrics['objective/kl_k1']:.3f}); the policy may be "
                 "exploiting the estimator (sampling tricks?); the exact KL is "
                 f"{metrics['objective/kl_full']:.3f}")
    if len(history) >= window:
        past = history[-window]
        rising = metrics["env/reward_mean"] > past["env/reward_mean"]
        collapsing = metrics["env/repeated_token_share"] > max(0.3, 2 * past["env/repeated_token_share"])
        if rising and collapsing:
            log.warn(f"ppo: step {step}: reward rises while {metrics['env/repeated_token_share']:.0%} of response "
                     "tokens repeat the previous one: likely reward hacking by degenerate repetition")


def sample_table(tok, gen, scores: torch.Tensor, n: int = 4) -> str:
    """Markdown table of a few query / response / reward samples (TensorBoard renders it)."""
    rows = ["| query | response | reward |", "| --- | --- | --- |"]
    for i in range(min(n, gen.prompt_tokens.shape[0])):
        query = tok.decode(gen.prompt_tokens[i][gen.prompt_mask[i].bool()].tolist())
        response = tok.decode(gen.response_tokens[i][gen.response_mask[i].bool()].tolist())
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
        rows.append(f"| {cell(query)} | {cell(response)} | {scores[i].item():.3f} |")
    return "\n".join(rows)
