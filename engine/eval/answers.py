"""Answers to prompts as evaluation needs them, during PPO and after it: sampled in batches with one
seed per row (so an answer does not depend on its batch), the exact KL between two policies over the
vocabulary summed over each answer, and a reward model's score of each prompt + answer read at the last
real token (as PPO reads it). Prompts are token lists; answers are token lists that end with EOS when
the model ended them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_engine.engine.model.generate import SamplingConfig, generate, prompt_response_rows
from rlhf_engine.engine.rl.reward import RewardFn
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.rl.rlhf_math import full_kl_from_log_softmax


def sample_answers(model, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig, eos_id: int,
                   pad_id: int, batch_size: int, progress=None) -> list[list[int]]:
    """One answer per prompt, row i drawn with its own generator seeded by seeds[i]; `progress(done)` after
    each batch."""
    out = []
    for start in range(0, len(prompts), batch_size):
        gen = generate(model, prompts[start:start + batch_size], sampling, eos_id, pad_id,
                       row_seeds=seeds[start:start + batch_size])
        out += [gen.response_tokens[r][gen.response_mask[r].bool()].tolist() for r in range(gen.ended.shape[0])]
        if progress is not None:
            progress(len(out))
    return out


@torch.no_grad()
def sequence_kl(model, baseline, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                dtype: str) -> list[float]:
    """Exact KL(π_model ‖ π_baseline) over the vocabulary at each response token, summed per response."""
    tokens, mask, P = prompt_response_rows(prompts, responses, pad_id, model.lm_head.weight.device)
    response_mask = mask[:, P:]
    with autocast(tokens.device, dtype):  # baseline: any callable (tokens, attention_mask=) -> logits
        logp = F.log_softmax(model(tokens, attention_mask=mask)[:, P - 1:-1].float(), -1)
        ref_logp = F.log_softmax(baseline(tokens, attention_mask=mask)[:, P - 1:-1].float(), -1)
    return (full_kl_from_log_softmax(logp, ref_logp) * response_mask).sum(1).tolist()


@torch.no_grad()
def score_responses(reward_fn: RewardFn, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    device, dtype: str, batch_size: int) -> list[float]:
    """The reward model's score of each prompt + response, read at the last real token as in PPO."""
    scores = []
    for start in range(0, len(responses), batch_size):
        tokens, mask, _ = prompt_response_rows(prompts[start:start + batch_size], responses[start:start + batch_size],
                                               pad_id, device)
        with autocast(tokens.device, dtype):
            scores += reward_fn(tokens, mask).float().tolist()
    return scores
