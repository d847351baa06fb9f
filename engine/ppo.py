"""PPO against a reward model with a per-token KL penalty (StackLLaMA step 3), as a numbered story.

Roles (engine/ppo_roles.py): policy = the (merged SFT) checkpoint + fresh LoRA adapters; reference =
the same network with adapters disabled (no second copy); value = a scalar head on the policy's
hidden states, or a value adapter initialised from the reward model; reward = a merged RM checkpoint,
an RM adapter on the policy's own frozen base, or any RewardFn (e.g. a scripted one in tests).
Dropout is off throughout.

Each step: 1. rollout (sample at temperature T, no top-k/top-p/min-length tricks by default),
2. score, 3. KL-penalised rewards, 4. advantages (GAE, whitened over the whole batch across ranks),
5. PPO epochs over shuffled minibatches, 6. log. The "old" log-probs come from the same function
the update uses, evaluated on the first minibatch's rows, so that minibatch's ratio is exactly 1
(asserted). Math lives in engine/rlhf_math.py; this file only sequences it.

Defaults follow StackLLaMA's rl_training.py: lr 1.4e-5, 4 PPO epochs, init KL coef 0.2 adaptive to
target 6 over horizon 10000, response length 32–128, LoRA r=16 α=32 dropout 0.05, γ=1, λ=0.95,
clip 0.2, value clip 0.2, vf_coef 0.1, reward baseline 0.
"""
from __future__ import annotations

import contextlib
import copy
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from data.loaders import PromptLoader
from data.pairs_io import read_pairs
from engine import ppo_diagnostics as D
from engine import rlhf_math as M
from engine.builder import autocast, build_model, resolve_tokenizer
from engine.dist import Dist, all_gather_objects, all_reduce_max, all_reduce_sum
from engine.generate import SamplingConfig, generate
from engine.logging import Logger, peak_memory_bytes
from engine.lora import load_adapter_weights, lora_state_dict, write_adapter
from engine.optim import BadStepGuard, build_adamw, clip_and_step
from engine.ppo_roles import VALUE, build_roles, mib
from engine.rollout import PolicyAndValue, RewardFn, Rollout, repeated_token_share, rollout_forward
from engine.stage_config import StageConfig, require_positive
from engine.train_state import load_trainer_state, resolve_resume, save_training_checkpoint, seed_everything


@dataclass(frozen=True)
class PPOConfig(StageConfig):
    reward_model: str = field(default=None, metadata={"help": "reward model: a merged RM folder (its own network), or "
                                                               "an RM adapter folder (a train.py rm checkpoint) put "
                                                               "on the policy's frozen base"})
    value_model: str = field(default="head", metadata={"help": "value function: a head on the policy's hidden states "
                                                                "(StackLLaMA), or a value adapter + head initialised "
                                                                "from the reward model",
                                                        "choices": ["head", "reward"]})
    data: str = field(default=None, metadata={"help": "pairs data whose questions are the prompts (the rl split)"})
    max_steps: int = field(default=100, metadata={"help": "PPO steps (rollout + update)"})
    batch_size: int = field(default=16, metadata={"help": "queries per rank per PPO step"})
    mini_batch_size: int = field(default=4, metadata={"help": "rows per rank per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per minibatch (gradient accumulation)"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    max_prompt_length: int = field(default=512, metadata={"help": "keep queries shorter than this (tokens)"})
    response_min_length: int = field(default=32, metadata={"help": "response length cap drawn per batch from "
                                                                   "[min, max]"})
    response_max_length: int = field(default=128, metadata={"help": "(see response-min-length)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0 = off; StackLLaMA's lesson: keep off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1 = off)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL in the reward",
                                                      "choices": ["k1", "k2", "k3", "full"]})
    kl_coef: float = field(default=0.2, metadata={"help": "initial KL coefficient β"})
    adaptive_kl: bool = field(default=True, metadata={"help": "adapt β towards --kl-target (else fixed)"})
    kl_target: float = field(default=6.0, metadata={"help": "target KL per response (adaptive controller)"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "adaptive controller horizon"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss coefficient"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient"})
    whiten: str = field(default="batch", metadata={"help": "whiten advantages over the whole batch across ranks, "
                                                           "or per minibatch (blog-era TRL)",
                                                   "choices": ["batch", "minibatch"]})
    reward_baseline: float = field(default=0.0, metadata={"help": "subtracted from every RM score"})
    reward_norm: bool = field(default=False, metadata={"help": "normalise scores by running mean/std"})
    reward_clip: float = field(default=0.0, metadata={"help": "clip shaped scores to ±this (0 = off)"})
    no_eos_penalty: float | None = field(default=None, metadata={"help": "reward for responses cut at the length "
                                                                         "cap (default: keep their RM score)"})
    target_kl: float = field(default=0.0, metadata={"help": "stop the epoch loop when approx KL exceeds this "
                                                            "(0 = off)"})
    ratio_threshold: float = field(default=10.0, metadata={"help": "skip a minibatch whose mean ratio exceeds "
                                                                   "this"})
    sample_every: int = field(default=10, metadata={"help": "log a table of samples every N steps"})
    lr: float = field(default=1.4e-5, metadata={"help": "learning rate"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    log_every: int = field(default=1, metadata={"help": "log every N steps"})

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("--data is required")
        require_positive(self, "max_steps", "batch_size", "mini_batch_size", "grad_accum", "ppo_epochs",
                         "max_prompt_length", "response_min_length")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --mini-batch-size "
                             f"{self.mini_batch_size}")
        if self.mini_batch_size % self.grad_accum:
            raise ValueError(f"--mini-batch-size {self.mini_batch_size} must be a multiple of --grad-accum "
                             f"{self.grad_accum}")
        if self.response_max_length < self.response_min_length:
            raise ValueError("--response-max-length must be >= --response-min-length")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for PPO sampling, got {self.temperature}")


def ppo_update(cfg: PPOConfig, dist: Dist, pv, ddp, optimizer, ro: Rollout, kl_coef: float, prompt_len: int,
               order: torch.Tensor, generator: torch.Generator, guard: BadStepGuard, step: int, log) -> dict:
    """Steps 3–5 on a scored rollout: KL-penalised rewards, advantages, PPO epochs. Returns statistics."""
    mask = ro.response_mask
    # 3. KL-penalised rewards: −β·KL_t on response tokens, plus the score at the last real token.
    kl = ro.kl_full if cfg.kl_estimator == "full" else M.kl_estimate(ro.logprobs, ro.ref_logprobs, cfg.kl_estimator)
    rewards, _ = M.kl_penalized_rewards(ro.scores, kl, mask, kl_coef)
    # 4. Advantages: GAE, whitened with statistics of the whole batch over all ranks.
    advantages, returns = M.gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten == "batch":
        mean, var = M.moments_to_stats(all_reduce_sum(dist, M.masked_moments(advantages, mask)))
        advantages = M.masked_whiten(advantages, mask, mean, var)
    # 5. PPO epochs over shuffled minibatches. A minibatch is one optimizer step, its gradient
    #    accumulated over grad_accum micro-batches; its loss is a mean over the global minibatch's tokens.
    B, mini, micro = ro.tokens.shape[0], cfg.mini_batch_size, cfg.mini_batch_size // cfg.grad_accum
    stats, skipped, stopped_early, ratio_max = [], 0, False, 0.0
    for epoch in range(cfg.ppo_epochs):
        perm = order if epoch == 0 else torch.randperm(B, generator=generator).to(order.device)
        for k in range(0, B, mini):
            batch_rows = perm[k:k + mini]
            n_tokens = all_reduce_sum(dist, mask[batch_rows].sum())
            batch_adv = advantages[batch_rows]
            if cfg.whiten == "minibatch":
                batch_adv = M.masked_whiten(batch_adv, mask[batch_rows])
            # Local sums over the micro-batches: [policy loss, value loss, entropy] (already divided by
            # the global token count), then token-weighted [clipfrac, value clipfrac, approx KL, ratio,
            # explained variance].
            sums, local_ratio_max = torch.zeros(8, device=mask.device), torch.zeros((), device=mask.device)
            for j in range(0, mini, micro):
                rows, m, adv = batch_rows[j:j + micro], mask[batch_rows[j:j + micro]], batch_adv[j:j + micro]
                last_micro = j + micro >= mini
                with (ddp.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()):
                    with autocast(dist.device, cfg.dtype):
                        logprobs, values, entropy, _ = ddp(ro.tokens[rows], ro.mask[rows], prompt_len,
                                                           cfg.temperature)
                    if epoch == 0 and k == 0:
                        drift = ((logprobs.detach() - ro.logprobs[rows]) * m).abs().max().item()
                        if drift != 0.0:
                            raise RuntimeError(f"ppo: importance ratio is not exactly 1 on the first minibatch "
                                               f"(max |log ratio| {drift:.2e}); old log-probs do not match the "
                                               "update")
                    pg_loss, pg = M.ppo_policy_loss(logprobs, ro.logprobs[rows], adv, m, cfg.cliprange, n_tokens)
                    vf_loss, vf = M.clipped_value_loss(values, ro.values[rows], returns[rows], m,
                                                       cfg.cliprange_value, n_tokens)
                    ent = M.masked_mean(entropy, m, n_tokens=n_tokens)
                    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * ent
                    (loss * dist.world_size).backward()  # DDP averages over ranks; the loss is already global
                n_local = m.sum()
                sums += torch.stack([pg_loss.detach(), vf_loss.detach(), ent.detach(), pg.clipfrac * n_local,
                                     vf.clipfrac * n_local, pg.approx_kl * n_local, pg.ratio_mean * n_local,
                                     vf.explained_variance * n_local])
                local_ratio_max = torch.maximum(local_ratio_max, pg.ratio_max.detach())
            ratio_max = max(ratio_max, all_reduce_max(dist, local_ratio_max).item())
            total = all_reduce_sum(dist, sums)
            total[3:] /= n_tokens.clamp(min=1)
            stats.append(total)
            if total[6].item() > cfg.ratio_threshold:  # TRL's guard against one wildly off-policy minibatch
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            else:
                global_loss = (total[0] + cfg.vf_coef * total[1] - cfg.entropy_coef * total[2]).item()
                clip_and_step(pv, optimizer, step, global_loss, cfg.grad_clip, guard, log)
            if cfg.target_kl and total[5].item() > cfg.target_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    s = torch.stack(stats).mean(0)
    return {"ppo/policy_loss": s[0].item(), "ppo/value_loss": s[1].item(), "objective/entropy": s[2].item(),
            "ppo/clipfrac": s[3].item(), "ppo/value_clipfrac": s[4].item(), "ppo/approx_kl": s[5].item(),
            "ppo/ratio_mean": s[6].item(), "ppo/ratio_max": ratio_max, "ppo/explained_variance": s[7].item(),
            "ppo/skipped_minibatches": skipped, "ppo/early_stopped": float(stopped_early),
            "ppo/returns_mean": M.masked_mean(returns, mask).item(),
            "ppo/advantages_mean": M.masked_mean(advantages, mask).item()}


def train(cfg: PPOConfig, dist: Dist, reward_fn: RewardFn | None = None) -> dict:
    seed_everything(cfg.seed)
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    lora = cfg.lora_config()
    policy = build_model(cfg.model, tok, dtype=cfg.dtype, lora=lora, load_in_8bit=cfg.load_in_8bit,
                         grad_checkpointing=cfg.grad_checkpointing, device=dist.device, seed=cfg.seed)
    log = Logger(cfg.out, dist.is_main, config=asdict(cfg))
    reference = None if lora else copy.deepcopy(policy).requires_grad_(False)  # full FT needs a frozen copy
    roles = build_roles(cfg, tok, policy, lora, dist.device, reward_fn)
    pv = PolicyAndValue(policy, roles.value_net, roles.value_adapter, roles.value_head_init)
    pv.eval()  # for good: dropout off in rollout and update alike
    reward_fn = roles.reward_fn
    log.info(f"ppo layout: {roles.layout}; trainable {mib(p for p in pv.parameters() if p.requires_grad):.2f} MiB")

    # One global batch of queries per step; rank r takes its slice (rollouts don't depend on world size).
    # A query must leave room for the longest response within the model's context.
    max_prompt = min(cfg.max_prompt_length, policy.cfg.max_seq_len - cfg.response_max_length)
    if max_prompt < 2:
        raise ValueError(f"--response-max-length {cfg.response_max_length} leaves no room for a prompt in the "
                         f"model's max_seq_len {policy.cfg.max_seq_len}")
    prompts = PromptLoader(read_pairs(cfg.data), tok, batch_size=cfg.batch_size * dist.world_size,
                           max_length=max_prompt, seed=cfg.seed)
    log.info(f"ppo: {len(prompts.queries):,} queries shorter than {max_prompt} tokens "
             f"({prompts.too_long:,} longer ones left out)")
    ddp = DDP(pv) if dist.enabled else pv
    optimizer = build_adamw(pv, cfg.lr, cfg.weight_decay)
    kl_coef, reward_stats, start = cfg.kl_coef, (0.0, 0.0, 0), 0
    guard = BadStepGuard(cfg.max_bad_steps, "ppo")
    resume_from = resolve_resume(dist, cfg.resume, cfg.out)
    if resume_from:
        state = load_trainer_state(dist, resume_from)
        load_adapter_weights(policy, resume_from)
        pv.value_head.load_state_dict(state["value_head"])
        if pv.value_net is not None:
            with torch.no_grad():
                for name, t in state["value_adapter"].items():
                    pv.value_net.get_parameter(name).copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        prompts.load_state_dict(state["prompts"])
        kl_coef, reward_stats, start = state["kl_coef"], tuple(state["reward_stats"]), state["step"]
        log.info(f"ppo: resumed from {resume_from} at step {start}")

    def write_model_files(folder):
        write_adapter(policy, lora, folder, base_model=cfg.model)
        shutil.copyfile(tok.path, f"{folder}/tokenizer.model")

    def save(step):
        if lora is None:
            log.warn("ppo: checkpoints are written for LoRA policies only")
            return
        save_training_checkpoint(dist, cfg.out, step, write_model_files, {
            "optimizer": optimizer.state_dict(), "prompts": prompts.state_dict(), "kl_coef": kl_coef,
            "reward_stats": list(reward_stats), "value_head": pv.value_head.state_dict(), "config": asdict(cfg),
            "value_adapter": lora_state_dict(pv.value_net, VALUE) if pv.value_net is not None else {}},
            keep=cfg.keep)

    queries = iter(prompts)
    history, metrics = [], {}
    for step in range(start, cfg.max_steps):
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            save(step)
        t0 = time.time()
        # 1. Rollout: sample responses at temperature T for this rank's slice of the query batch.
        batch = next(queries)
        mine = slice(dist.rank * cfg.batch_size, (dist.rank + 1) * cfg.batch_size)
        prompt_lists = [t[m].tolist() for t, m in zip(batch.tokens[mine], batch.attention_mask[mine])]
        max_new = random.Random(cfg.seed * 100_003 + step).randint(cfg.response_min_length, cfg.response_max_length)
        sampling = SamplingConfig(max_new_tokens=max_new, temperature=cfg.temperature, top_k=cfg.top_k,
                                  top_p=cfg.top_p)
        first_row = (step * dist.world_size + dist.rank) * cfg.batch_size  # global index of this rank's first row
        gen = generate(policy, prompt_lists, sampling, tok.eos_id, tok.pad_id,
                       row_seeds=[cfg.seed * 1_000_003 + first_row + i for i in range(len(prompt_lists))])
        P = gen.prompt_tokens.shape[1]
        tokens = torch.cat([gen.prompt_tokens, gen.response_tokens], 1)
        mask = torch.cat([gen.prompt_mask, gen.response_mask], 1)
        response_mask = gen.response_mask.float()
        lengths = gen.response_mask.sum(1)
        ended = gen.response_tokens.gather(1, (lengths - 1)[:, None]).squeeze(1) == tok.eos_id
        t_gen = time.time()
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + step * 31 + dist.rank)
        order = torch.randperm(cfg.batch_size, generator=generator).to(dist.device)
        with autocast(dist.device, cfg.dtype):
            logprobs, values, ref_logprobs, kl_full, (t_policy, t_ref) = rollout_forward(
                pv, reference, tokens, mask, P, cfg.temperature, order, cfg.mini_batch_size // cfg.grad_accum)
        t_fwd = time.time()
        # 2. Score: reward model on query + response, then baseline / normalisation / clipping.
        raw_scores = reward_fn(tokens, mask).to(dist.device).float()
        if cfg.reward_norm:
            everyone = torch.cat([torch.as_tensor(x) for x in all_gather_objects(dist, raw_scores.cpu())])
            reward_stats = M.running_moments_update(*reward_stats, everyone)
        scores = M.shape_scores(raw_scores, ended, cfg.reward_baseline,
                                reward_stats[:2] if cfg.reward_norm else None, cfg.reward_clip, cfg.no_eos_penalty)
        t_reward = time.time()
        rollout = Rollout(tokens, mask, response_mask, logprobs * response_mask, ref_logprobs * response_mask,
                          values * response_mask, kl_full * response_mask, scores, ended)

        # 3.–5. KL-penalised rewards, advantages, PPO epochs.
        train_stats = ppo_update(cfg, dist, pv, ddp, optimizer, rollout, kl_coef, P, order, generator, guard,
                                 step, log)
        t_update = time.time()

        # 6. Log; then move β towards the KL target with this batch's mean KL per response.
        kls = {name: M.masked_sum(M.kl_estimate(rollout.logprobs, rollout.ref_logprobs, name), response_mask, 1)
               for name in ("k1", "k2", "k3")}
        kls["full"] = M.masked_sum(rollout.kl_full, response_mask, 1)
        mean_kl = {k: all_reduce_sum(dist, v.mean()).item() / dist.world_size for k, v in kls.items()}
        used_kl = mean_kl[cfg.kl_estimator]
        metrics = {**train_stats, **{f"objective/kl_{k}": v for k, v in mean_kl.items()},
                   "objective/kl": used_kl, "objective/kl_coef": kl_coef,
                   **D.reward_stats(dist, raw_scores, scores, ended), **D.length_stats(dist, lengths, ended),
                   **D.negative_kl_stats(dist, rollout.logprobs - rollout.ref_logprobs, response_mask,
                                         gen.response_tokens, tok),
                   "env/repeated_token_share": repeated_token_share(gen.response_tokens, gen.response_mask),
                   "time/generate": t_gen - t0, "time/policy_forward": t_policy, "time/reference_forward": t_ref,
                   "time/reward": t_reward - t_fwd, "time/update": t_update - t_reward,
                   "perf/tokens_per_s": all_reduce_sum(dist, mask.sum()).item() / (t_update - t0),
                   "perf/peak_mem_gb": peak_memory_bytes(dist.device) / 2**30}
        if cfg.adaptive_kl:
            kl_coef = M.adaptive_kl_coef(kl_coef, used_kl, cfg.batch_size * dist.world_size, cfg.kl_target,
                                         cfg.kl_horizon)
        D.warnings(log, step, metrics, history)
        history.append({k: v for k, v in metrics.items() if not isinstance(v, torch.Tensor)})
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            log.scalars(step, metrics)
            log.line(step + 1, cfg.max_steps, {"reward": metrics["env/reward_mean"], "kl": used_kl, "beta": kl_coef,
                                               "len": metrics["env/response_length_mean"],
                                               "clipfrac": train_stats["ppo/clipfrac"],
                                               "s/step": round(t_update - t0, 2)})
        if cfg.sample_every and step % cfg.sample_every == 0:
            log.text(step, "samples", D.sample_table(tok, gen, raw_scores))
    save(cfg.max_steps)
    log.close()
    return {"history": history, **history[-1]} if history else {"history": history}
