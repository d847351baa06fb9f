"""PPO's rollout (steps 1–2 of engine/ppo.py): sample responses, run the forwards the update will
repeat, read the reward model's scores, and return it all as one named `Rollout`.

A rollout row is [prompt (left-padded, P) | response (right-padded, R)]: the sampler's layout. The
forwards run those rows as they are (no linear computes their padding, `llama.Unpadded`) and
read the distribution over response token t at the token before it, column P - 1 + t.
`PolicyAndValue.forward` computes the rollout's "old" log-probs and values and, in the update, the
new ones; the reference log-probs are the same network with its adapters disabled. On identical
inputs the old and new log-probs are bit-identical, so the first minibatch's importance ratio is
exactly 1 (ppo.py asserts it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from rlhf_engine.data.loaders import PromptLoader
from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.engine.model.generate import Generation, SamplingConfig, generate
from rlhf_engine.engine.model.lora import disable_lora, use_adapter
from rlhf_engine.engine.model.llama import LLaMA, Transformer
from rlhf_engine.engine.rl.reward import Ensemble, RewardFn
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.rl.rlhf_math import per_token_kl
from rlhf_engine.kernels.logprobs import hidden_logprobs_with_reference, hidden_token_logprobs


class Rollout(NamedTuple):
    tokens: torch.Tensor  # [B, P + R] prompt then response
    attention_mask: torch.Tensor  # [B, P + R] 1 on real tokens (prompt, and response up to EOS)
    prompt_len: int  # P: response token t sits at column P + t
    response_mask: torch.Tensor  # [B, R] float, 1 on real response tokens (what the losses see)
    sampler_logprobs: torch.Tensor  # [B, R] log-probs the sampler drew each token with (KV-cache decode)
    logprobs: torch.Tensor  # [B, R] old log-probs: the update's own forward, before any update
    ref_logprobs: torch.Tensor  # [B, R] under the reference (adapters off)
    values: torch.Tensor  # [B, R] value of the state before each response token
    kl_full: torch.Tensor  # [B, R] exact KL(π‖π_ref) over the vocabulary at each response token
    raw_scores: torch.Tensor  # [B] reward-model scores, before any shaping
    ended: torch.Tensor  # [B] bool: the response ended with EOS (else cut at the length cap)
    order: torch.Tensor  # [B] first-epoch minibatch order: the chunks the old log-probs were computed in
    seconds: dict[str, float]  # wall time of generate, policy_forward, reference_forward, reward
    member_scores: torch.Tensor | None = None  # [M, B] each ensemble member's score (None: one reward model)

    @property
    def response_tokens(self) -> torch.Tensor:  # [B, R]
        return self.tokens[:, self.prompt_len:]


class ReferenceHidden(NamedTuple):
    hidden: torch.Tensor  # [B, R, dim] the reference's last hidden states at the response positions
    lm_head_weight: torch.Tensor  # [V, dim]


class PolicyOutput(NamedTuple):
    logprobs: torch.Tensor  # [B, R] of the response tokens, at the sampling temperature
    values: torch.Tensor  # [B, R]
    entropy: torch.Tensor  # [B, R] of the policy's distribution at each response position
    ref_logprobs: torch.Tensor | None  # [B, R] under the reference, when its hidden states are given (no grad)
    kl_full: torch.Tensor | None  # [B, R] exact KL(π‖π_ref) over the vocabulary, likewise


def response_hidden(body: Transformer, tokens, attention_mask, prompt_len: int) -> torch.Tensor:
    """[B, R, dim]: `body`'s last hidden state at the token before each response token of the rows
    [B, P + R] (what predicts response token t: column P − 1 + t). The prompt's last token is always real
    (left padding); positions past a response's EOS read padding's zeros, which the response mask drops."""
    return body(tokens, attention_mask=attention_mask)[:, prompt_len - 1:-1]


class PolicyAndValue(nn.Module):
    """Policy (LLaMA + LoRA) plus a value function. DDP wraps this, so one forward gives everything
    the PPO loss differentiates.

    Value: a scalar head on the policy's last hidden states (StackLLaMA), or, when `value_net` is
    given, a head on `value_net`'s hidden states with adapter `value_adapter` active (PPO's
    `--value-model reward`: the reward network plus a trainable adapter, which may be the very
    network the policy runs on, with another adapter). With `critic` False (the critic-free estimators)
    there is no value function at all: no parameters, and values are 0.
    """

    def __init__(self, policy: LLaMA, value_net: LLaMA | None = None, value_adapter: str | None = None,
                 value_head_init: torch.Tensor | None = None, critic: bool = True, compile: bool = False):
        super().__init__()
        self.policy = policy
        # The transformer this forward runs: the rollout's scoring and the update (which must agree bit for bit)
        # both run it, compiled with `compile`; the sampler's decode keeps the eager network. A plain attribute,
        # not a second registration of the policy's modules (which would repeat them in state_dict and DDP).
        object.__setattr__(self, "body", torch.compile(policy.model, dynamic=True) if compile else policy.model)
        self.value_net, self.value_adapter = value_net, value_adapter
        self.value_head = None
        if not critic:
            return
        self.value_head = nn.Linear(policy.cfg.dim, 1, bias=True, device=policy.lm_head.weight.device)
        nn.init.zeros_(self.value_head.bias)
        with torch.no_grad():
            if value_head_init is None:
                nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the returns
            else:
                self.value_head.weight.copy_(value_head_init.reshape(1, -1))  # e.g. the RM's score head

    def forward(self, tokens, attention_mask, prompt_len: int, temperature: float = 1.0,
                reference: ReferenceHidden | None = None) -> PolicyOutput:
        """Log-probs and entropy go through the chunked kernel (no [B, R, V] float32 tensor kept for
        backward). Given the reference's response hidden states (the rollout), the same pass over the
        vocabulary also yields the reference's log-probs and the exact KL, bit-identical log-probs included."""
        hidden = response_hidden(self.body, tokens, attention_mask, prompt_len)  # [B, R, dim]
        ref_logprobs = kl_full = None
        if reference is None:
            logprobs, entropy = hidden_token_logprobs(hidden, self.policy.lm_head.weight, tokens[:, prompt_len:],
                                                      temperature, with_entropy=True)
        else:
            logprobs, entropy, ref_logprobs, kl_full = hidden_logprobs_with_reference(
                hidden, self.policy.lm_head.weight, reference.hidden, reference.lm_head_weight,
                tokens[:, prompt_len:], temperature)
        value_hidden = hidden
        if self.value_net is not None:
            with use_adapter(self.value_net, self.value_adapter):
                value_hidden = response_hidden(self.value_net.model, tokens, attention_mask, prompt_len)
        values = (self.value_head(value_hidden.float()).squeeze(-1).float() if self.value_head is not None
                  else logprobs.new_zeros(logprobs.shape, dtype=torch.float32))
        return PolicyOutput(logprobs, values, entropy, ref_logprobs, kl_full)



class ScoredResponses(NamedTuple):
    logprobs: torch.Tensor  # [B, R] old log-probs
    values: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor  # [B, R]
    kl_full: torch.Tensor  # [B, R]
    policy_seconds: float
    reference_seconds: float


@torch.no_grad()
def sample_rows(policy: LLaMA, prompts: list[list[int]], sampling: SamplingConfig, row_seeds: list[int] | None,
                eos_id: int, pad_id: int, dtype: str) -> Generation:
    """Step 1's sampling, the one call PPO (rollout and ReMax's greedy baseline) and `train.py check` make:
    a KV-cache decode under the update's autocast, so the sampler computes exactly as the update will
    (float32 adapters on a bf16 base). Row i is drawn from its own generator seeded row_seeds[i]."""
    with autocast(policy.lm_head.weight.device, dtype):
        return generate(policy, prompts, sampling, eos_id, pad_id, row_seeds=row_seeds)


@torch.no_grad()
def score_rollout(pv: PolicyAndValue, reference: LLaMA | None, tokens, attention_mask, prompt_len: int,
                  temperature: float, order: torch.Tensor, chunk: int, dtype: str) -> ScoredResponses:
    """Old log-probs and values, reference log-probs and the exact per-token KL, all [B, R].

    Runs `chunk` rows at a time in the first epoch's minibatch order, with the very function the
    update uses on the very same rows and under the update's autocast, so the first minibatch's ratio
    is exactly 1. `reference` None means the policy's own base (adapters disabled); otherwise a
    separate frozen network.
    """
    with autocast(tokens.device, dtype):
        return _score_chunks(pv, reference, tokens, attention_mask, prompt_len, temperature, order, chunk)


def _score_chunks(pv, reference, tokens, attention_mask, prompt_len, temperature, order, chunk) -> ScoredResponses:
    B, R = tokens.shape[0], tokens.shape[1] - prompt_len
    logprobs, values, ref_logprobs, kl_full = (torch.zeros(B, R, device=tokens.device) for _ in range(4))
    policy_seconds = reference_seconds = 0.0
    for k in range(0, B, chunk):
        rows = order[k:k + chunk]
        t0 = time.time()
        ref = reference if reference is not None else pv.policy
        with (disable_lora(pv.policy) if reference is None else contextlib.nullcontext()):
            hidden = response_hidden(ref.model, tokens[rows], attention_mask[rows], prompt_len)
        t1 = time.time()
        # The policy's forward reads the vocabulary once for its own log-probs, the reference's and the KL.
        out = pv(tokens[rows], attention_mask[rows], prompt_len, temperature,
                 reference=ReferenceHidden(hidden, ref.lm_head.weight))
        reference_seconds, policy_seconds = reference_seconds + t1 - t0, policy_seconds + time.time() - t1
        logprobs[rows], values[rows] = out.logprobs.float(), out.values.float()  # autocast may hand back bf16
        ref_logprobs[rows], kl_full[rows] = out.ref_logprobs, out.kl_full
    return ScoredResponses(logprobs, values, ref_logprobs, kl_full, policy_seconds, reference_seconds)


@torch.no_grad()
def build_rollout(pv: PolicyAndValue, reference: LLaMA | None, reward_fn: RewardFn, prompts: list[list[int]], *,
                  sampling: SamplingConfig, row_seeds: list[int], eos_id: int, pad_id: int, order: torch.Tensor,
                  chunk: int, dtype: str) -> Rollout:
    """Sample a response to each prompt, score every response token with the policy, the value
    function and the reference, and read the reward model's score of each whole row."""
    t0 = time.time()
    gen = sample_rows(pv.policy, prompts, sampling, row_seeds, eos_id, pad_id, dtype)
    t_generate = time.time() - t0
    tokens, attention_mask, P = gen.rows()
    response_mask = gen.response_mask.float()
    scored = score_rollout(pv, reference, tokens, attention_mask, P, sampling.temperature, order, chunk, dtype)
    t1 = time.time()
    member_scores = None
    if isinstance(reward_fn, Ensemble):  # each member's score is logged, so keep them apart before combining
        member_scores = reward_fn.members(tokens, attention_mask).to(tokens.device).float()
        raw_scores = reward_fn.combine(member_scores)
    else:
        raw_scores = reward_fn(tokens, attention_mask).to(tokens.device).float()
    return Rollout(
        tokens=tokens, attention_mask=attention_mask, prompt_len=P, response_mask=response_mask,
        sampler_logprobs=gen.response_logprobs * response_mask, logprobs=scored.logprobs * response_mask,
        ref_logprobs=scored.ref_logprobs * response_mask, values=scored.values * response_mask,
        kl_full=scored.kl_full * response_mask, raw_scores=raw_scores, ended=gen.ended, order=order,
        seconds={"generate": t_generate, "policy_forward": scored.policy_seconds,
                 "reference_forward": scored.reference_seconds, "reward": time.time() - t1},
        member_scores=member_scores)


class GreedyBaseline(NamedTuple):
    raw_scores: torch.Tensor  # [G] reward-model score of the greedy response to each prompt
    ended: torch.Tensor  # [G] bool: it ended with EOS
    kl: torch.Tensor  # [G] Σ_t KL_t of the greedy response (the reward's estimator), for its KL penalty


@torch.no_grad()
def greedy_baseline(pv: PolicyAndValue, reference: LLaMA | None, reward_fn: RewardFn, prompts: list[list[int]],
                    sampling: SamplingConfig, tok, dtype: str, kl_estimator: str) -> GreedyBaseline:
    """ReMax's baseline: the policy's greedy response to each prompt, scored as a sampled response is (its RM
    score and the per-token KL to the reference under the sampling temperature), so that the baseline and
    the sampled totals (score − β·Σ KL_t) measure the same thing. Without its KL term the baseline sat above
    every sampled total by about β·KL, and nearly every advantage came out negative."""
    gen = sample_rows(pv.policy, prompts, dataclasses.replace(sampling, temperature=0.0), None, tok.eos_id,
                      tok.pad_id, dtype)
    tokens, attention_mask, P = gen.rows()
    G = len(prompts)
    scored = score_rollout(pv, reference, tokens, attention_mask, P, sampling.temperature,
                           torch.arange(G, device=tokens.device), chunk=G, dtype=dtype)
    kl = per_token_kl(scored.logprobs, scored.ref_logprobs, scored.kl_full, kl_estimator)
    return GreedyBaseline(reward_fn(tokens, attention_mask).to(tokens.device).float(), gen.ended,
                          (kl * gen.response_mask).sum(1))


def prompt_loader(cfg, dist, tok, max_seq_len: int, log) -> PromptLoader:
    """One global batch of queries per step (rank r takes its slice, so rollouts do not depend on the
    world size); a query must leave room for the longest response within the model's context."""
    max_prompt = min(cfg.max_prompt_length, max_seq_len - cfg.response_max_length)
    if max_prompt < 2:
        raise ValueError(f"--response-max-length {cfg.response_max_length} leaves no room for a prompt in the "
                         f"model's max_seq_len {max_seq_len}")
    prompts = PromptLoader(read_pairs(cfg.data), tok, batch_size=cfg.batch_size * dist.world_size,
                           max_length=max_prompt, seed=cfg.seed)
    log.info(f"ppo: {len(prompts.queries):,} queries shorter than {max_prompt} tokens "
             f"({prompts.too_long:,} longer ones left out)")
    return prompts
