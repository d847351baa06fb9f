"""What a PPO checkpoint holds beyond the policy's adapter files, and how a run resumes from it: the
optimizer, the prompt cursor, the KL controller's β, the running reward moments, the value head and
value adapter, and the config. Written and found like every stage's checkpoints (engine/training/train_state.py).
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from rlhf_engine.engine.weights.adapters import load_adapter_weights
from rlhf_engine.engine.training.dist import Dist
from rlhf_engine.engine.model.lora import lora_state_dict
from rlhf_engine.engine.rl.roles import VALUE
from rlhf_engine.engine.rl.rlhf_math import RunningMoments
from rlhf_engine.engine.rl.rollout import PolicyAndValue
from rlhf_engine.engine.training.train_state import load_trainer_state, save_training_checkpoint, write_stage_model


def save(dist: Dist, cfg, step: int, pv: PolicyAndValue, tok, optimizer, prompts, kl_coef: float,
         reward_moments: RunningMoments, log, protect: str | None = None) -> None:
    """Collective: checkpoint-<step> with the policy adapter (PEFT layout) and the trainer state; rotation
    (--keep) spares `protect`."""
    if cfg.lora is None:
        log.warn("ppo: checkpoints are written for LoRA policies only")
        return
    state = {"optimizer": optimizer.state_dict(), "prompts": prompts.state_dict(), "kl_coef": kl_coef,
             "reward_moments": list(reward_moments), "config": asdict(cfg),
             "value_head": pv.value_head.state_dict() if pv.value_head is not None else {},
             "value_adapter": lora_state_dict(pv.value_net, VALUE) if pv.value_net is not None else {}}
    save_training_checkpoint(dist, cfg.out, step,
                             lambda folder: write_stage_model(folder, pv.policy, cfg.lora, tok, cfg.model),
                             state, keep=cfg.keep, protect=protect)


def restore(dist: Dist, path: str, pv: PolicyAndValue, optimizer, prompts) -> tuple[float, RunningMoments, int]:
    """Load a PPO checkpoint in place; returns (β, reward moments, step) to continue from."""
    state = load_trainer_state(dist, path)
    load_adapter_weights(pv.policy, path)
    if pv.value_head is not None:
        pv.value_head.load_state_dict(state["value_head"])
    if pv.value_net is not None:
        with torch.no_grad():
            for name, t in state["value_adapter"].items():
                pv.value_net.get_parameter(name).copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    prompts.load_state_dict(state["prompts"])
    return state["kl_coef"], RunningMoments(*state["reward_moments"]), state["step"]
