"""Step 5 of PPO (engine/ppo.py): epochs of clipped-surrogate updates over the rollout's minibatches.

`ppo_epochs` walks the minibatches (epoch 0 in the order the rollout scored its rows, so the first
minibatch's importance ratio is exactly 1: checked here), accumulates each minibatch's gradient over
micro-batches, and steps the optimizer once per minibatch; `micro_batch_loss` is the loss of a few rows
and their statistics as named sums. The loss pieces are pure functions in rlhf_math.py and estimators.py.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.rl.config import PPOConfig
from rlhf_engine.engine.rl.estimators import k3_kl_loss
from rlhf_engine.engine.rl.rlhf_math import clipped_value_loss, masked_mean, masked_whiten, ppo_policy_loss
from rlhf_engine.engine.rl.rollout import Rollout
from rlhf_engine.engine.training.dist import Dist, all_reduce_max, all_reduce_named, all_reduce_sum, grad_sync
from rlhf_engine.engine.training.optim import BadStepGuard, clip_and_step

TOKEN_WEIGHTED = ("clipfrac", "value_clipfrac", "approx_kl", "ratio_mean", "explained_variance")
KL_IN_LOSS = ("grpo", "dr_grpo")  # estimators whose KL penalty is a loss term (k3), not part of the reward


class Optimisation(NamedTuple):
    """What step 5 steps with: the (DDP-wrapped) PolicyAndValue, its optimizer, the guard against NaN/Inf
    steps, and how far the first minibatch's |log ratio| may sit from 0 (first_minibatch_tolerance)."""
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    guard: BadStepGuard
    ratio_tolerance: float


class UpdateBatch(NamedTuple):
    """What step 5 learns from: this step's rollout, its advantages and returns [B, R], β, and the generator
    of the later epochs' minibatch shuffles."""
    rollout: Rollout
    advantages: torch.Tensor
    returns: torch.Tensor
    kl_coef: float
    shuffler: torch.Generator


class Update(NamedTuple):
    metrics: dict  # the minibatch statistics, averaged, as logged (ppo/*, objective/entropy, onpolicy/...)
    seconds: float


def ppo_epochs(cfg: PPOConfig, dist: Dist, opt: Optimisation, batch: UpdateBatch, step: int, log) -> Update:
    """Step 5: `ppo_epochs` passes over the rollout in minibatches of `mini_batch_size` rows per rank. A
    minibatch is one optimizer step, its gradient accumulated over `grad_accum` micro-batches; its loss
    is a mean over the global minibatch's real tokens (Dr. GRPO: a sum over tokens divided by rows x the
    response length cap, so long and short responses weigh alike per token). The first minibatch
    re-scores the rollout's rows with the rollout's own function: its |log ratio| must not exceed
    `opt.ratio_tolerance`."""
    t0 = time.time()
    rollout, ddp = batch.rollout, opt.ddp
    pv = ddp.module if isinstance(ddp, DDP) else ddp
    response_mask, (B, R) = rollout.response_mask, rollout.response_mask.shape
    mini, micro = cfg.mini_batch_size, cfg.mini_batch_size // cfg.grad_accum
    minibatches, skipped, stopped_early, ratio_max, drift = [], 0, False, 0.0, 0.0
    for epoch in range(cfg.ppo_epochs):
        perm = rollout.order if epoch == 0 else torch.randperm(B, generator=batch.shuffler).to(rollout.order.device)
        for start in range(0, B, mini):
            rows = perm[start:start + mini]
            n_tokens = all_reduce_sum(dist, response_mask[rows].sum())
            loss_tokens = n_tokens if cfg.estimator != "dr_grpo" else n_tokens.new_tensor(mini * dist.world_size * R)
            minibatch_adv = batch.advantages[rows]
            if cfg.whiten == "minibatch" and cfg.estimator == "ppo":
                minibatch_adv = masked_whiten(minibatch_adv, response_mask[rows])
            sums, local_ratio_max = {}, torch.zeros((), device=response_mask.device)
            for j in range(0, mini, micro):
                with grad_sync(dist, ddp, sync=j + micro >= mini):  # gradients cross ranks once per minibatch
                    loss, stats = micro_batch_loss(cfg, ddp, rollout, rows[j:j + micro], minibatch_adv[j:j + micro],
                                                   batch.returns, loss_tokens, batch.kl_coef)
                    (loss * dist.world_size).backward()  # DDP averages over ranks; the loss is already global
                sums = {name: sums.get(name, 0) + value for name, value in stats.items() if not name.endswith("max")}
                local_ratio_max = torch.maximum(local_ratio_max, stats["ratio_max"])
                if epoch == 0 and start == 0:
                    drift = max(drift, all_reduce_max(dist, stats["log_ratio_abs_max"]).item())
                    if drift > opt.ratio_tolerance:
                        raise RuntimeError(f"ppo: the first minibatch's importance ratio is not 1 (max |log ratio| "
                                           f"{drift:.2e} > {opt.ratio_tolerance:g}): the update does not reproduce "
                                           "the rollout's old log-probs")
            ratio_max = max(ratio_max, all_reduce_max(dist, local_ratio_max).item())
            total = all_reduce_named(dist, sums)  # "loss" is the minibatch's whole loss, as backward saw it
            for name in TOKEN_WEIGHTED:
                total[name] /= max(n_tokens.item(), 1.0)
            minibatches.append(total)
            if total["ratio_mean"] > cfg.ratio_threshold:  # TRL's guard against one wildly off-policy minibatch
                opt.optimizer.zero_grad(set_to_none=True)
                skipped += 1
            else:
                clip_and_step(pv, opt.optimizer, step, total["loss"], cfg.grad_clip, opt.guard, log)
            if cfg.early_stop_kl and total["approx_kl"] > cfg.early_stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    mean = {name: sum(m[name] for m in minibatches) / len(minibatches) for name in minibatches[0]}
    return Update({**{f"ppo/{name}": value for name, value in mean.items() if name != "entropy"},
                   "objective/entropy": mean["entropy"], "ppo/ratio_max": ratio_max, "ppo/skipped_minibatches": skipped,
                   "ppo/early_stopped": float(stopped_early), "ppo/minibatches": len(minibatches),
                   "onpolicy/first_minibatch_drift": drift}, time.time() - t0)


def micro_batch_loss(cfg: PPOConfig, ddp, rollout: Rollout, rows, advantages, returns, n_tokens, kl_coef: float):
    """The loss of `rows`: the clipped policy surrogate, + vf_coef · the clipped value loss (PPO's critic),
    + β · the k3 KL to the reference (GRPO), − the entropy bonus; each a sum over their tokens divided by
    the global minibatch's `n_tokens`. And this micro-batch's statistics as named sums (token-weighted
    ones multiplied by its local token count), its detached loss among them: summed over micro-batches and
    ranks, the minibatch's loss as backward saw it."""
    response_mask = rollout.response_mask[rows]
    with autocast(rollout.tokens.device, cfg.dtype):
        out = ddp(rollout.tokens[rows], rollout.attention_mask[rows], rollout.prompt_len, cfg.temperature)
    pg_loss, pg = ppo_policy_loss(out.logprobs, rollout.logprobs[rows], advantages, response_mask, cfg.cliprange,
                                  n_tokens)
    zero = pg_loss.new_zeros(())
    vf_loss, vf = clipped_value_loss(out.values, rollout.values[rows], returns[rows], response_mask,
                                     cfg.cliprange_value, n_tokens) if cfg.estimator == "ppo" else (zero, None)
    kl_loss = (k3_kl_loss(out.logprobs, rollout.ref_logprobs[rows], response_mask, n_tokens)
               if cfg.estimator in KL_IN_LOSS else zero)
    entropy = masked_mean(out.entropy, response_mask, n_tokens=n_tokens)
    # With no entropy bonus no gradient reaches the entropy, and its backward pass over the vocabulary is skipped.
    loss = pg_loss + cfg.vf_coef * vf_loss + kl_coef * kl_loss - (cfg.entropy_coef * entropy if cfg.entropy_coef else 0)
    n_local = response_mask.sum()
    return loss, {"loss": loss.detach(), "policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "kl_loss": kl_loss.detach(),
                  "entropy": entropy.detach(), "clipfrac": pg.clipfrac * n_local,
                  "value_clipfrac": vf.clipfrac * n_local if vf else zero,
                  "approx_kl": pg.approx_kl * n_local, "ratio_mean": pg.ratio_mean * n_local,
                  "explained_variance": vf.explained_variance * n_local if vf else zero,
                  "ratio_max": pg.ratio_max.detach(),
                  "log_ratio_abs_max": ((out.logprobs.detach() - rollout.logprobs[rows]) * response_mask).abs().max()}
