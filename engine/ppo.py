"""PPO against a reward model with a per-token KL penalty (StackLLaMA step 3), as a numbered story.

Read `train()` from its step loop: 1. rollout, 2. score, 3. KL-penalised rewards, 4. advantages,
5. PPO epochs, 6. log. Three files tell the whole step: this one, engine/rl/rollout.py, which builds the
rollout and holds the forward the update differentiates, and engine/rl/update.py (step 5). The
math is in engine/rl/rlhf_math.py, who plays which role (policy, reference, reward, value) in
engine/rl/roles.py, the flags and their StackLLaMA defaults in engine/rl/config.py.

The "old" log-probs come from the same function the update uses, evaluated on the first minibatch's
rows in the same chunks, so that minibatch's importance ratio is exactly 1 (asserted). Dropout is off
throughout (the model stays in eval mode). Sampling has no top-k/top-p/min-length tricks by default.
"""
from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import asdict

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf_engine.engine.rl import checkpoint as ppo_checkpoint
from rlhf_engine.engine.training import roofline
from rlhf_engine.engine.weights.builder import build_model, resolve_tokenizer
from rlhf_engine.engine.rl.estimators import grpo_advantages, remax_advantages, returns_to_go, rloo_advantages
from rlhf_engine.engine.training.dist import Dist, all_gather_objects, all_reduce_sum
from rlhf_engine.engine.model.generate import SamplingConfig
from rlhf_engine.engine.training.logging import Logger, peak_memory_bytes
from rlhf_engine.engine.training.optim import BadStepGuard, build_adamw
from rlhf_engine.engine.rl.config import PPOConfig
from rlhf_engine.engine.rl.diagnostics import (closing_summary, failure_warnings, first_minibatch_tolerance,
                                               onpolicy_warning, sample_table, step_metrics, step_report)
from rlhf_engine.engine.rl.invariants import logprob_tolerance
from rlhf_engine.engine.eval.best import improves, load_best, publish
from rlhf_engine.engine.eval.best import summary as best_summary
from rlhf_engine.engine.eval.ppo_eval import PPOEval, curve_summary
from rlhf_engine.engine.rl.reward import RewardFn
from rlhf_engine.engine.rl.roles import build_roles, mib
from rlhf_engine.engine.rl.rlhf_math import (RunningMoments, adaptive_kl_coef, gae, kl_penalized_rewards,
                                             masked_mean, masked_moments, masked_whiten, moments_to_stats, per_token_kl,
                                             running_moments_update, shape_scores)
from rlhf_engine.engine.rl.rollout import PolicyAndValue, build_rollout, greedy_baseline, prompt_loader
from rlhf_engine.engine.rl.update import KL_IN_LOSS, Optimisation, UpdateBatch, ppo_epochs
from rlhf_engine.engine.training.train_state import (checkpoint_path, lock_run_folder, resolve_resume, resumed_step,
                                                     row_seed, seed_everything)


def train(cfg: PPOConfig, dist: Dist, reward_fn: RewardFn | None = None) -> dict:
    lock_run_folder(dist, cfg.out)  # one run per --out; also removes partial checkpoints of killed runs
    limits = roofline.measured_peaks(dist.device.type)  # before the model exists: its buffers stay out of the peak
    seed_everything(cfg.seed, deterministic=cfg.deterministic)
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    policy = build_model(cfg.model, tok, dtype=cfg.dtype, lora=cfg.lora, load_in_8bit=cfg.load_in_8bit,
                         grad_checkpointing=cfg.grad_checkpointing, device=dist.device, seed=cfg.seed)
    resume_from = resolve_resume(dist, cfg.resume, cfg.out)
    # A resumed run's logs continue from its checkpoint: rows of steps it will redo are dropped.
    log = Logger(cfg.out, dist.is_main, config=asdict(cfg), resume_step=resumed_step(dist, resume_from))
    reference = None if cfg.lora else copy.deepcopy(policy).requires_grad_(False)  # full FT needs a frozen copy
    roles = build_roles(cfg, tok, policy, dist.device, reward_fn)
    pv = PolicyAndValue(policy, roles.value_net, roles.value_adapter, roles.value_head_init,
                        critic=cfg.estimator == "ppo", compile=cfg.compile)
    pv.eval()  # for good: dropout off in rollout and update alike
    log.info(f"ppo: world {dist.world_size}, device {dist.device}, dtype {cfg.dtype}, {torch.get_num_threads()} "
             f"threads per rank (OMP_NUM_THREADS); layout: {roles.layout}; trainable "
             f"{mib(p for p in pv.parameters() if p.requires_grad):.2f} MiB; this machine: {roofline.describe(limits)}")
    prompts = prompt_loader(cfg, dist, tok, policy.cfg.max_seq_len, log)
    ddp = DDP(pv) if dist.enabled else pv
    optimizer = build_adamw(pv, cfg.lr, cfg.weight_decay)
    guard = BadStepGuard(cfg.max_bad_steps, "ppo")
    kl_coef, reward_moments, start = cfg.kl_coef, RunningMoments(), 0
    if resume_from:
        kl_coef, reward_moments, start = ppo_checkpoint.restore(dist, resume_from, pv, optimizer, prompts)
        log.info(f"ppo: resumed from {resume_from} at step {start}")
    evaluator = PPOEval(cfg, dist, tok, policy, reference, roles.reward_fn) if cfg.eval_every else None
    best = load_best(cfg.out) if resume_from else None  # the best checkpoint by the judge so far (eval/best.py)
    evals = {}  # step -> evaluation metrics, this run's

    ratio_tolerance = first_minibatch_tolerance(dist.device, cfg.dtype, cfg.deterministic)
    log.info("ppo: the first minibatch's importance ratio must be " + (
        "exactly 1 (the update re-runs the rollout's deterministic kernels on the same rows)" if ratio_tolerance == 0
        else f"1 within |log ratio| <= {ratio_tolerance:g} ({dist.device.type} {cfg.dtype}; --deterministic makes it "
        "exact)"))
    optimisation = Optimisation(ddp, optimizer, guard, ratio_tolerance)

    def save(step):
        ppo_checkpoint.save(dist, cfg, step, pv, tok, optimizer, prompts, kl_coef, reward_moments, log,
                            protect=checkpoint_path(cfg.out, best.step) if best else None)

    def evaluate(step):  # and name the checkpoint best when the judge scores it highest so far
        nonlocal best
        evals[step] = evaluator.run_and_log(log, step)
        better = improves(best, step, evals[step])
        if better and cfg.lora:
            best = better
            if not os.path.isdir(checkpoint_path(cfg.out, step)):
                save(step)
            if dist.is_main:
                publish(cfg.out, best)

    queries, history = iter(prompts), []
    micro = cfg.mini_batch_size // cfg.grad_accum
    for step in range(start, cfg.max_steps):
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            save(step)
        if evaluator and step % cfg.eval_every == 0:
            evaluate(step)
        t0 = time.time()
        # 1. Rollout: this rank's slice of the global query batch; sample a response to each, score every
        #    response token with the policy, the value function and the reference, and read the RM's score.
        batch = next(queries)
        mine = slice(dist.rank * cfg.batch_size, (dist.rank + 1) * cfg.batch_size)
        group = cfg.samples_per_prompt  # each query `group` times in a row: never split over ranks
        prompt_lists = [t[m].tolist() for t, m in zip(batch.tokens[mine], batch.attention_mask[mine])
                        for _ in range(group)]
        # One length cap per step, drawn from (seed, step) alone, so every rank draws the same cap.
        max_new = random.Random(row_seed(cfg.seed, step)).randint(cfg.response_min_length, cfg.response_max_length)
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=cfg.temperature)
        # A row's sampler is seeded by (seed, the row's global index): its sample ignores the world size.
        first_row = (step * dist.world_size + dist.rank) * len(prompt_lists)
        # Minibatch shuffles come from (seed, step, rank); epoch 0's order is also the order the rollout
        # scored the rows in, which is what makes the first minibatch's ratio exactly 1.
        shuffler = torch.Generator().manual_seed(row_seed(cfg.seed, step, dist.rank))
        order = torch.randperm(len(prompt_lists), generator=shuffler).to(dist.device)
        rollout = build_rollout(pv, reference, roles.reward_fn, prompt_lists, sampling=sampling,
                                row_seeds=[row_seed(cfg.seed, first_row + i) for i in range(len(prompt_lists))],
                                eos_id=tok.eos_id, pad_id=tok.pad_id, order=order, chunk=micro, dtype=cfg.dtype)
        response_mask = rollout.response_mask

        # 2. Score: baseline, running normalisation over every rank's scores, clipping, no-EOS penalty.
        if cfg.reward_norm:
            everyone = torch.cat([torch.as_tensor(x) for x in all_gather_objects(dist, rollout.raw_scores.cpu())])
            reward_moments = running_moments_update(*reward_moments, everyone)
        shape = lambda raw, ended: shape_scores(raw, ended, cfg.reward_baseline,  # noqa: E731
                                                reward_moments[:2] if cfg.reward_norm else None, cfg.reward_clip,
                                                cfg.no_eos_penalty)
        scores = shape(rollout.raw_scores, rollout.ended)

        # 3. KL-penalised rewards: −β·KL_t on every response token, plus the score at the last real one
        #    (GRPO and Dr. GRPO leave the KL out of the reward: it is a loss term in step 5).
        kl = per_token_kl(rollout.logprobs, rollout.ref_logprobs, rollout.kl_full, cfg.kl_estimator)
        rewards, penalty = kl_penalized_rewards(scores, kl, response_mask,
                                                0.0 if cfg.estimator in KL_IN_LOSS else kl_coef)

        # 4. Advantages: GAE, whitened with the statistics of the whole batch over all ranks; or a
        #    critic-free estimator (engine/rl/estimators.py), whose returns are its advantages.
        if cfg.estimator == "ppo":
            advantages, returns = gae(rewards, rollout.values, response_mask, cfg.gamma, cfg.lam)
            if cfg.whiten == "batch":
                advantages = whiten_over_ranks(dist, advantages, response_mask)
        else:
            greedy = None
            # ReMax: the greedy response's total reward, its score − β·Σ KL_t, as the others'
            if cfg.estimator == "remax":
                g = greedy_baseline(pv, reference, roles.reward_fn, prompt_lists[::group], sampling, tok, cfg.dtype,
                                    cfg.kl_estimator)
                greedy = shape(g.raw_scores, g.ended) - kl_coef * g.kl
            advantages = returns = critic_free_advantages(cfg, dist, scores, rewards, response_mask, greedy)

        # 5. PPO epochs over shuffled minibatches (epoch 0 in the rollout's order).
        update = ppo_epochs(cfg, dist, optimisation, UpdateBatch(rollout, advantages, returns, kl_coef, shuffler),
                            step, log)
        t_end = time.time()

        # 6. Log (with how far each phase ran from this machine's limit); then move β towards the KL target.
        report = step_report(cfg, policy, rollout, update.seconds, update.metrics["ppo/minibatches"])
        metrics = {**update.metrics, **step_metrics(dist, rollout, scores, penalty, cfg.kl_estimator, cfg.cliprange,
                                                    tok, t_end - t0),
                   "objective/kl_coef": kl_coef,
                   "ppo/returns_mean": masked_mean(returns, response_mask).item(),
                   "ppo/advantages_mean": masked_mean(advantages, response_mask).item(),
                   **{f"time/{phase}": seconds for phase, seconds in rollout.seconds.items()},
                   "time/update": update.seconds, "time/step": t_end - t0,
                   "perf/peak_mem_gb": peak_memory_bytes(dist.device) / 2**30, **report.metrics}
        if cfg.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, metrics["objective/kl"], len(prompt_lists) * dist.world_size,
                                       cfg.kl_target, cfg.kl_horizon)
        failure_warnings(log, step, metrics, history)
        onpolicy_warning(log, step, metrics, history,
                         logprob_tolerance(dist.device, cfg.dtype, cfg.load_in_8bit, decode=True),
                         cfg.onpolicy_warn_every)
        history.append({key: v for key, v in metrics.items() if not isinstance(v, torch.Tensor)})
        due = step % cfg.log_every == 0 or step == cfg.max_steps - 1
        if due:
            log.scalars(step, metrics)
        log.line(step + 1, cfg.max_steps, {"reward": metrics["env/reward_mean"], "kl": metrics["objective/kl"],
                                           "beta": kl_coef, "len": metrics["env/response_length_mean"],
                                           "clipfrac": metrics["ppo/clipfrac"], "s/step": round(t_end - t0, 2),
                                           "limit": report.line},
                 due=due)
        if cfg.sample_every and step % cfg.sample_every == 0:
            log.text(step, "samples", sample_table(tok, rollout, rollout.raw_scores))
    if evaluator:
        evaluate(cfg.max_steps)
    if not os.path.isdir(checkpoint_path(cfg.out, cfg.max_steps)):
        save(cfg.max_steps)
    for line in closing_summary(cfg, history, kl_coef, checkpoint_path(cfg.out, cfg.max_steps) if cfg.lora else None):
        log.info(line)
    if evals:
        log.info("ppo: " + curve_summary(evals, cfg.eval_prompts))
    for line in best_summary(cfg.out, best, cfg.max_steps, cfg.judge is not None) if evaluator and cfg.lora else ():
        log.info(line)
    log.close()
    return {"history": history, "evals": evals, **(history[-1] if history else {})}


def whiten_over_ranks(dist: Dist, x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mean, var = moments_to_stats(all_reduce_sum(dist, masked_moments(x, response_mask)))
    return masked_whiten(x, response_mask, mean, var)


def critic_free_advantages(cfg: PPOConfig, dist: Dist, scores, rewards, response_mask, greedy_scores) -> torch.Tensor:
    """Step 4 without a critic: one advantage per response on each of its tokens (REINFORCE++: per token).
    Rows come in groups of k consecutive responses to one query."""
    if cfg.estimator == "reinforce_pp":  # KL-penalised returns-to-go, whitened over the global batch
        return whiten_over_ranks(dist, returns_to_go(rewards, response_mask, cfg.gamma), response_mask)
    by_group = lambda x: x.reshape(-1, cfg.samples_per_prompt)  # noqa: E731
    if cfg.estimator in KL_IN_LOSS:
        per_response = grpo_advantages(by_group(scores), scale=cfg.estimator == "grpo")
    else:  # RLOO and ReMax: each response's total reward, score − β·Σ KL_t
        total = by_group(rewards.sum(1))
        per_response = rloo_advantages(total) if cfg.estimator == "rloo" else remax_advantages(total, greedy_scores)
    return per_response.reshape(-1, 1) * response_mask
