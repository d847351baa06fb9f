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

from engine.lora import use_adapter
from engine.model import LLaMA
from engine.rlhf_math import last_token_index
from kernels.logprobs import hidden_token_logprobs


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
    """Policy (LLaMA + LoRA) plus a value function. DDP wraps this, so one forward gives everything
    the PPO loss differentiates.

    Value: a scalar head on the policy's last hidden states (StackLLaMA), or, when `value_net` is
    given, a head on `value_net`'s hidden states with adapter `value_adapter` active (PPO's
    `--value-model reward`: the reward network plus a trainable adapter, which may be the very
    network the policy runs on, with another adapter).
    """

    def __init__(self, policy: LLaMA, value_net: LLaMA | None = None, value_adapter: str | None = None,
                 value_head_init: torch.Tensor | None = None):
        super().__init__()
        self.policy = policy
        self.value_net, self.value_adapter = value_net, value_adapter
        self.value_head = nn.Linear(policy.cfg.dim, 1, bias=True, device=policy.lm_head.weight.device)
        nn.init.zeros_(self.value_head.bias)
        with torch.no_grad():
            if value_head_init is None:
                nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
            else:
                self.value_head.weight.copy_(value_head_init.reshape(1, -1))  # e.g. the RM's score head

    def forward(self, tokens, mask, prompt_len: int, temperature: float = 1.0, full_dist: bool = False):
        """(logprobs [B, R], values [B, R], entropy [B, R], log-softmax [B, R, V] or None) of the response.

        Log-probs and entropy go through the chunked kernel (no [B, R, V] float32 tensor kept for
        backward); the full log-softmax is built only when asked (the rollout's exact KL, no grad).
        """
        hidden = self.policy.model(tokens, attention_mask=mask)[:, prompt_len - 1:-1]  # [B, R, dim]
        logprobs, entropy = hidden_token_logprobs(hidden, self.policy.lm_head.weight, tokens[:, prompt_len:],
                                                  temperature, with_entropy=True)
        value_hidden = hidden
        if self.value_net is not None:
            with use_adapter(self.value_net, self.value_adapter):
                value_hidden = self.value_net.model(tokens, attention_mask=mask)[:, prompt_len - 1:-1]
        values = self.value_head(value_hidden.float()).squeeze(-1).float()
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


def reward_model_fn(net: LLaMA, head: nn.Module | None = None, adapter: str | None = None) -> RewardFn:
    """Scores from a reward network at the last real token of each row: `net`'s own score head, or
    `head` on its hidden states with adapter `adapter` active (a reward adapter on the policy's base).

    Rows are left-padded prompt + right-padded response; the RM wants one right-padded sequence, so
    each row's real tokens are packed to the left first.
    """
    head = head if head is not None else net.score

    @torch.no_grad()
    def score(tokens, mask):
        order = torch.argsort((~mask.bool()).int(), dim=1, stable=True)  # real tokens first, in order
        packed, packed_mask = tokens.gather(1, order), mask.gather(1, order)
        with use_adapter(net, adapter):
            hidden = net.model(packed, attention_mask=packed_mask)
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(packed_mask)]
        return head(last.to(head.weight.dtype)).squeeze(-1).float()
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
