"""The reward as the RL stages see it: a function from (tokens, attention_mask) to one score per row,
the network behind it, and the one loader of a reward model from disk. train.py rm trains through
PairScores; PPO, eval, check and evaluation during PPO score through RewardFn.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
import torch.nn as nn

from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.engine.model.lora import DEFAULT, use_adapter
from rlhf_engine.engine.rl.rlhf_math import combine_rewards, last_token_index
from rlhf_engine.engine.weights.adapters import ADAPTER_CONFIG, is_adapter_folder
from rlhf_engine.engine.weights.builder import load_model
from rlhf_engine.engine.weights.hf_folder import CONFIG

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PairScores(nn.Module):
    """Rewards of chosen and rejected in one forward: DDP wraps this."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask):
        scores = self.model(tokens, attention_mask=mask)  # [2B, L]
        return scores.float().gather(1, last_token_index(mask)[:, None]).squeeze(1)  # [2B]


def reward_model_fn(net: LLaMA, head: nn.Module | None = None, adapter: str | None = None, *,
                    eos_id: int) -> RewardFn:
    """Scores from a reward network at the last real token of each row, a finished answer's EOS left out:
    `net`'s own score head, or `head` on its hidden states with adapter `adapter` active (a reward adapter
    on the policy's base). `adapter` None scores with every adapter off: right for a merged RM (which may
    carry a value adapter), wrong for an RM loaded as an adapter, whose adapter must be named.

    Why the EOS is left out: the RM learnt from "Question: … Answer: …" texts without one (StackLLaMA's
    reward data, `train.py rm`), and PPO and eval score the policy's answers as that text, as StackLLaMA
    scores the decoded string. Read at the EOS, a position it never trained on, the demo's reward models
    fell from 0.79 to 0.52-0.69 held-out accuracy and its judge from 0.75-0.78 to 0.59-0.68.

    Rows are left-padded prompt + right-padded response (the model runs their real tokens only); the
    score is read at each row's last real token.
    """
    head = head if head is not None else net.score

    @torch.no_grad()
    def score(tokens, attention_mask):
        mask = without_final_eos(tokens, attention_mask, eos_id)
        with use_adapter(net, adapter):
            hidden = net.model(tokens, attention_mask=mask)
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(mask)]
        return head(last.to(head.weight.dtype)).squeeze(-1).float()
    return score


def without_final_eos(tokens: torch.Tensor, attention_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The mask with each row's last real token dropped where it is `eos_id` (a finished answer)."""
    last = last_token_index(attention_mask)
    rows = torch.arange(len(tokens), device=tokens.device)
    finished = tokens[rows, last] == eos_id
    mask = attention_mask.clone()
    mask[rows[finished], last[finished]] = False
    return mask


class Ensemble:
    """Reward-model members as one RewardFn: `members` scores a batch with each ([M, B], one forward each),
    calling it combines them (rlhf_math.combine_rewards). The rollout calls `members` to log each one."""

    def __init__(self, member_fns: list[RewardFn], how: str, uwo_lambda: float):
        self.member_fns, self.how, self.uwo_lambda = member_fns, how, uwo_lambda

    def members(self, tokens, attention_mask) -> torch.Tensor:
        return torch.stack([fn(tokens, attention_mask) for fn in self.member_fns])

    def combine(self, members: torch.Tensor) -> torch.Tensor:
        return combine_rewards(members, self.how, self.uwo_lambda)

    def __call__(self, tokens, attention_mask) -> torch.Tensor:
        return self.combine(self.members(tokens, attention_mask))


def is_reward_model(path: str) -> bool:
    """A train.py rm adapter (PEFT task SEQ_CLS, score head beside it) or a merged RM folder (transformers'
    LlamaForSequenceClassification); anything else has no trained score head."""
    if is_adapter_folder(path):
        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            return json.load(f).get("task_type") == "SEQ_CLS"
    config = os.path.join(path, CONFIG)
    if not os.path.exists(config):
        return False
    with open(config) as f:
        return "LlamaForSequenceClassification" in json.load(f).get("architectures", [])


def load_reward_network(path: str, tok, dtype: str, device, load_in_8bit: bool,
                        base_fallback: str | None = None) -> tuple[LLaMA, str | None]:
    """A reward model from disk through the one checkpoint loader (weights/builder.load_model): (network, the
    adapter to score with). A merged RM folder scores with every adapter off (None); an RM adapter folder
    (its score head beside it) goes on the base its adapter_config.json names, or on `base_fallback` when
    that path is not here (check passes --model). A network without a trained score head is refused: its
    scores would be random."""
    if not is_reward_model(path):
        raise ValueError(f"{path} is not a reward model (no trained score head: expected a train.py rm checkpoint "
                         "or a merged RM)")
    net = load_model(path, tok, head="score", dtype=dtype, device=device, load_in_8bit=load_in_8bit,
                     base_fallback=base_fallback)
    return net, DEFAULT if is_adapter_folder(path) else None


def load_reward_model(path: str, tok, dtype: str, device, load_in_8bit: bool) -> RewardFn:
    """A reward model from disk as the function PPO, eval and evaluation during PPO score with."""
    net, adapter = load_reward_network(path, tok, dtype, device, load_in_8bit)
    return reward_model_fn(net, adapter=adapter, eos_id=tok.eos_id)
