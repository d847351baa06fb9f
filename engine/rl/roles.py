"""Which network plays which PPO role, and what each costs in memory.

policy    = the SFT checkpoint + the trainable "default" LoRA adapter.
reference = the same network with every adapter disabled (no copy; a frozen copy for full fine-tuning).
reward    = a merged reward-model checkpoint (its own network), or an RM adapter folder as written by
            `train.py rm` put on the policy's frozen base as adapter "reward", its score head beside
            it: then one base serves policy, reference, reward and value. Several RM adapter folders
            make an ensemble (adapters "reward0", "reward1", ...; one scoring forward each), combined
            by --reward-ensemble.
value     = a scalar head on the policy's hidden states (StackLLaMA), or (`--value-model reward`) a
            value network initialised from the reward model: the reward network with a trainable
            "value" adapter (a copy of the reward adapter, or zero-initialised on a merged RM) and a
            head that starts as the RM's score head, so V starts as the RM's score of each prefix.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
import torch.nn as nn

from rlhf_engine.engine.weights.adapters import (is_adapter_folder, load_adapter_weights, read_adapter_base,
                                                 read_adapter_config)
from rlhf_engine.engine.model.lora import LoRAConfig, adapter_parameters, apply_lora, lora_layers
from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.engine.rl.reward import Ensemble, RewardFn, load_reward_network, reward_model_fn

REWARD, VALUE = "reward", "value"

# A reward function maps (tokens [B, L], attention mask [B, L] of the whole query+response) to scores [B].
class Roles(NamedTuple):
    reward_fn: RewardFn
    value_net: LLaMA | None  # None: the value head reads the policy's hidden states
    value_adapter: str | None
    value_head_init: torch.Tensor | None
    layout: str  # one line for the log: who is who, and the memory each adds


def mib(params) -> float:
    return sum(p.numel() * p.element_size() for p in params) / 2**20


def _float_adapter(net: nn.Module, name: str, trainable: bool) -> None:
    """Adapters compute in float32 beside a bf16 or 8-bit base (as the policy's own, see builder)."""
    for p in adapter_parameters(net, name):
        p.data = p.data.float()
        p.requires_grad_(trainable)


def build_roles(cfg, tok, policy: LLaMA, device: torch.device, reward_fn: RewardFn | None) -> Roles:
    """Load or attach the reward and value networks for PPOConfig `cfg` around `policy`."""
    lora = cfg.lora
    base = mib(policy.parameters())
    base_line = f"policy base {base:.1f} MiB; reference = " + (
        "the same base with adapters disabled (+0 MiB)" if lora else f"a frozen copy (+{base:.1f} MiB)")
    reward_net, reward_adapter, score = None, None, None
    paths = cfg.reward_model or ()
    if len(paths) < 2 and (cfg.reward_ensemble != "mean" or cfg.uwo_lambda != 1.0):
        raise ValueError("--reward-ensemble and --uwo-lambda combine several --reward-model adapters; "
                         f"{len(paths)} given")
    if reward_fn is not None:
        reward_line = "reward = a function (scripted)"
    elif not paths:
        raise ValueError("--reward-model is required")
    elif len(paths) > 1:  # an ensemble: every member an adapter on the policy's base, one forward each
        members = []
        for i, path in enumerate(paths):
            if not is_adapter_folder(path):
                raise ValueError(f"--reward-model {path}: ensemble members must be RM adapter folders (train.py rm "
                                 "checkpoints), which share the policy's frozen base; this is a merged model")
            members.append(reward_model_fn(policy, _attach_reward_adapter(cfg, path, f"{REWARD}{i}", policy, lora),
                                           f"{REWARD}{i}", eos_id=tok.eos_id))
        reward_fn = Ensemble(members, cfg.reward_ensemble, cfg.uwo_lambda)
        added = sum(mib(adapter_parameters(policy, f"{REWARD}{i}")) for i in range(len(paths)))
        reward_line = (f"reward = {cfg.reward_ensemble} of an ensemble of {len(paths)} adapters on the policy base "
                       f"(+{added:.2f} MiB)")
    elif is_adapter_folder(paths[0]):
        reward_net, reward_adapter = policy, REWARD
        score = _attach_reward_adapter(cfg, paths[0], REWARD, policy, lora)
        reward_line = (f"reward = adapter '{REWARD}' on the policy base ({paths[0]}, "
                       f"+{mib(adapter_parameters(policy, REWARD)) + mib(score.parameters()):.2f} MiB)")
    else:  # a merged RM, its own network, through the one RM loader
        reward_net, _ = load_reward_network(paths[0], tok, cfg.dtype, device, cfg.load_in_8bit)
        score = reward_net.score
        reward_line = f"reward = model {paths[0]} (+{mib(reward_net.parameters()):.1f} MiB)"
    if reward_fn is None:
        reward_fn = reward_model_fn(reward_net, score, reward_adapter, eos_id=tok.eos_id)

    if cfg.estimator != "ppo":
        return Roles(reward_fn, None, None, None, "; ".join([base_line, reward_line, "value = none (critic-free)"]))
    if cfg.value_model == "head":
        return Roles(reward_fn, None, None, None, "; ".join(
            [base_line, reward_line, "value = a head on the policy's hidden states"]))
    if reward_net is None:
        raise ValueError("--value-model reward needs a reward model (--reward-model), not a scripted reward")
    if reward_adapter is not None:  # value adapter = a trainable copy of the reward adapter, same base
        apply_lora(reward_net, _no_dropout(read_adapter_config(paths[0])), VALUE)
        with torch.no_grad():
            for _, layer in lora_layers(reward_net, REWARD):
                for mine, theirs in zip(layer.adapters[VALUE].parameters(), layer.adapters[REWARD].parameters()):
                    mine.copy_(theirs)
        where = "the policy base"
    else:  # value adapter zero-initialised on the merged RM: the value network starts as the RM
        apply_lora(reward_net, _no_dropout(lora or LoRAConfig()), VALUE)
        reward_net.model.grad_checkpointing = cfg.grad_checkpointing
        where = "the reward model"
    _float_adapter(reward_net, VALUE, trainable=True)
    value_line = (f"value = adapter '{VALUE}' on {where}, initialised from the reward model "
                  f"(+{mib(adapter_parameters(reward_net, VALUE)):.2f} MiB)")
    return Roles(reward_fn, reward_net, VALUE, score.weight.detach().float().clone(),
                 "; ".join([base_line, reward_line, value_line]))


def _no_dropout(cfg: LoRAConfig) -> LoRAConfig:
    return dataclasses.replace(cfg, dropout=0.0)  # PPO runs with dropout off everywhere


def _attach_reward_adapter(cfg, path: str, name: str, policy: LLaMA, lora: LoRAConfig | None) -> nn.Linear:
    """Put the RM adapter folder `path` on the policy's base as adapter `name`; return its score head."""
    if lora is None:
        raise ValueError(f"--reward-model {path} is an adapter; it can share the policy's frozen base only when "
                         "the policy trains LoRA adapters (drop --no-lora, or merge it with train.py merge)")
    base = read_adapter_base(path)
    if base and os.path.exists(base) and os.path.realpath(base) != os.path.realpath(cfg.model):
        raise ValueError(f"--reward-model {path} is an adapter trained on {base}, not on the policy's base "
                         f"{cfg.model}; merge it onto its own base (train.py merge) and pass the merged folder")
    apply_lora(policy, _no_dropout(read_adapter_config(path)), name)
    _float_adapter(policy, name, trainable=False)
    extras = load_adapter_weights(policy, path, name, extras="return")
    if "score.weight" not in extras:
        raise ValueError(f"--reward-model {path}: the adapter has no score.weight beside it, so it is not a "
                         "reward model (train.py rm writes one)")
    weight = extras.pop("score.weight")
    if extras:
        raise ValueError(f"--reward-model {path}: unexpected tensors {sorted(extras)} beside the adapter")
    if tuple(weight.shape) != (1, policy.cfg.dim):
        raise ValueError(f"--reward-model {path}: score.weight has shape {list(weight.shape)}, expected "
                         f"[1, {policy.cfg.dim}]")
    head = nn.Linear(policy.cfg.dim, 1, bias=False, device=policy.lm_head.weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head.requires_grad_(False)


