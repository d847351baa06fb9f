"""What PPO needs around the model: the rollout's tensors, the one forward that gives response
log-probs / values / entropy, and reward functions.

A rollout row is [prompt (left-padded, P) | response (right-padded, R)]. The forward sees the whole
row with its attention mask; the distribution over response token t is read at position P − 1 + t.
The same function computes the rollout's "old" log-probs, the reference log-probs (adapters off) and
the update's new log-probs, so on identical inputs they are bit-identical and the first minibatch's
importance ratio is exactly 1.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model import LLaMA
from kernels.logprobs import hidden_token_logprobs
from engine.rlhf_math import last_token_index


class Rollout(NamedTuple):
    tokens: torch.Tensor  # [B, P + R] prompt then response
    mask: torch.Tensor  # [B, P + R] 1 on real tokens (prompt and response up to EOS)
    response_mask: torch.Tensor  # [B, R] float, 1 on real response tokens
    logprobs: torch.Tensor  # [B, R] old log-probs under the policy (0 on padding)
    ref_logprobs: torch.Tensor  # [B, R] under the reference (adapters off)
    values: torch.Tensor  # [B, R] value of the state before each response token
    kl_full: torch.Tensor  # [B, R] exact KL(π‖π_ref) over the vocabulary at each response token
    scores: torch.Tensor  # [B] reward-model scores after shaping
    ended: torch.Tensor  # [B] bool: the response ended with EOS (else cut at the length cap)


class PolicyAndValue(nn.Module):
    """Policy (LLaMA + LoRA) plus a scalar value head on its last hidden states. DDP wraps this, so
    one forward gives everything the PPO loss differentiates."""

    def __init__(self, policy: LLaMA):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.cfg.dim, 1, bias=True, device=policy.lm_head.weight.device)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
        nn.init.zeros_(self.value_head.bias)

    def forward(self, tokens, mask, prompt_len: int, temperature: float = 1.0, full_dist: bool = False):
        """(logprobs [B, R], values [B, R], entropy [B, R], log-softmax [B, R, V] or None) of the response.

        Log-probs and entropy go through the chunked kernel (no [B, R, V] float32 tensor kept for
        backward); the full log-softmax is built only when asked (the rollout's exact KL, no grad).
        """
        hidden = self.policy.model(tokens, attention_mask=mask)[:, prompt_len - 1:-1]  # [B, R, dim]
        logprobs, entropy = hidden_token_logprobs(hidden, self.policy.lm_head.weight, tokens[:, prompt_len:],
                                                  temperature, with_entropy=True)
        values = self.value_head(hidden.float()).squeeze(-1).float()
        logp_all = response_log_softmax(self.policy, hidden, temperature) if full_dist else None
        return logprobs, values, entropy, logp_all


def response_log_softmax(model: LLaMA, hidden, temperature: float):
    """log π(· | state) [B, R, V] at temperature T from response-position hidden states [B, R, dim]."""
    return F.log_softmax(model.lm_head(hidden).float() / temperature, -1)


@torch.no_grad()
def rollout_forward(pv: PolicyAndValue, reference: LLaMA | None, tokens, mask, prompt_len: int,
                    temperature: float, order: torch.Tensor, mini: int):
    """Old log-probs, values, reference log-probs and exact per-token KL, all [B, R].

    Runs chunk by chunk in the first epoch's minibatch order, with the very function the update
    uses, so the first minibatch's ratio is exactly 1. `reference` None means the policy's own base
    (LoRA adapters disabled); otherwise a separate frozen network.
    """
    from engine.lora import disable_lora
    from engine.rlhf_math import full_kl_from_log_softmax
    B, R = tokens.shape[0], tokens.shape[1] - prompt_len
    out = [torch.zeros(B, R, device=tokens.device) for _ in range(4)]
    timing = [0.0, 0.0]
    for k in range(0, B, mini):
        rows = order[k:k + mini]
        t0 = time.time()
        logprobs, values, _, logp_all = pv(tokens[rows], mask[rows], prompt_len, temperature, full_dist=True)
        t1 = time.time()
        ref = reference if reference is not None else pv.policy
        with (disable_lora(pv.policy) if reference is None else contextlib.nullcontext()):
            hidden = ref.model(tokens[rows], attention_mask=mask[rows])[:, prompt_len - 1:-1]
            ref_all = response_log_softmax(ref, hidden, temperature)
        timing[0], timing[1] = timing[0] + t1 - t0, timing[1] + time.time() - t1
        out[0][rows], out[1][rows] = logprobs.float(), values.float()  # autocast may hand back bf16
        out[2][rows] = ref_all.gather(-1, tokens[rows, prompt_len:, None]).squeeze(-1)
        out[3][rows] = full_kl_from_log_softmax(logp_all, ref_all)
    return (*out, timing)


# A reward function maps (tokens [B, L], mask [B, L] of the whole query+response) to scores [B].
RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reward_model_fn(rm: LLaMA) -> RewardFn:
    """Scores from a reward model (scalar head) at the last real token of each row.

    Rows are left-padded prompt + right-padded response; the RM wants one right-padded sequence, so
    each row's real tokens are packed to the left first.
    """
    @torch.no_grad()
    def score(tokens, mask):
        order = torch.argsort((~mask.bool()).int(), dim=1, stable=True)  # real tokens first, in order
        packed, packed_mask = tokens.gather(1, order), mask.gather(1, order)
        scores = rm(packed, attention_mask=packed_mask)
        return scores.float().gather(1, last_token_index(packed_mask)[:, None]).squeeze(1)
    return score


def token_kind(piece: str) -> str:
    """Coarse type of a sentencepiece piece, to see where negative KL concentrates."""
    text = piece.replace("\u2581", " ")
    if piece.startswith("<") and piece.endswith(">"):
        return "special/byte"
    if not text.strip():
        return "whitespace"
    if text.strip().isdigit():
        return "digit"
    if all(not c.isalnum() for c in text.strip()):
        return "punctuation"
    return "word"


def repeated_token_share(tokens: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of response tokens equal to the token before them: high values flag degenerate loops
    (the blog's "```" reward hack)."""
    same = (tokens[:, 1:] == tokens[:, :-1]) & mask[:, 1:].bool() & mask[:, :-1].bool()
    return same.sum().item() / max(1, mask[:, 1:].sum().item())
