"""Direct preference optimisation: the policy learns from the answer pairs themselves, with no reward model
and no sampling (Rafailov et al. 2023; Hugging Face's sequel to StackLLaMA, stack_llama_2).

Each pair is "<bos>Question: q\\n\\nAnswer: a<eos>" for the chosen and the rejected answer, in one forward
as one batch (as the reward model's). The loss reads only the answer tokens (each side's prompt length
comes from the loader) through the chunked log-prob kernel, summed per answer. The reference is the
policy with its LoRA adapters off (engine/model/lora.disable_lora): no second model, and at step 0 policy
and reference are the same network, so the first loss is exactly ln 2. That is why DPO here needs LoRA.

Steps, ranks and evaluation work as in the reward model (engine/rm.py): one global batch of pairs per
step, rank r trains on its slice, the loss is the mean over the global batch, so the loss curve does not
depend on the world size. Evaluation reports the held-out DPO loss, and the accuracy of the implicit
reward β·log π/π_ref next to "the longer answer wins", the same yardstick as the reward model's.

Defaults follow stack_llama_2's dpo_llama2.py: β 0.1, lr 5e-4 cosine with 100 warm-up steps, weight decay
0.05, LoRA r=8 α=16 dropout 0.05 on the attention projections, 4 pairs per rank; max length 512 (theirs
was 1024) as the reward model's, so that DPO and the reward model learn from the same pairs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf_engine.data.loaders import PairLoader, pad
from rlhf_engine.engine.model.lora import LoRAConfig, disable_lora
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.rl.rlhf_math import dpo_loss
from rlhf_engine.engine.training.dist import Dist, all_reduce_named, grad_sync
from rlhf_engine.engine.training.logging import Logger, peak_memory_bytes
from rlhf_engine.engine.eval.pair_accuracy import against_length_rule, rule_comparison_text
from rlhf_engine.engine.training.pair_data import dropped_or_cut, next_global_batch, pair_data
from rlhf_engine.engine.training.optim import BadStepGuard, build_adamw, clip_and_step, cosine_lr, set_lr
from rlhf_engine.engine.training.roofline import (causal_attended, forward_flops, measured_peaks, mfu,
                                                  training_flops_per_token)
from rlhf_engine.engine.training.stage_config import ScheduledStageConfig, require_non_negative, require_positive
from rlhf_engine.engine.training.train_state import (lock_run_folder, resume_if_asked, save_stage_checkpoint,
                                                     seed_everything)
from rlhf_engine.engine.weights.builder import build_model, count_params, resolve_tokenizer
from rlhf_engine.kernels.logprobs import hidden_token_logprobs

LOSSES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class DPOConfig(ScheduledStageConfig):
    data: str = field(default=None, metadata={"help": "pairs data (parquet/jsonl file, folder or glob): the "
                                                      "reward split, the pairs a reward model would learn from"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out pairs (the evaluation split); "
                                                                   "default: every 20th pair of --data"})
    beta: float = field(default=0.1, metadata={"help": "β: strength of the implicit KL leash to the reference "
                                                       "(IPO: its τ)"})
    loss: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo (Azar et al., per-token "
                                                           "mean log-ratios)", "choices": list(LOSSES)})
    label_smoothing: float = field(default=0.0, metadata={"help": "ε: the share of labels assumed flipped "
                                                                  "(conservative DPO; sigmoid only)"})
    max_length: int = field(default=512, metadata={
        "help": "drop pairs where either side is longer (tokens; --truncate cuts them instead); the reward model's "
                "default, so both learn from the same pairs"})
    truncate: bool = field(default=False, metadata={
        "help": "cut pairs longer than --max-length to their first max-length tokens instead of dropping them "
                "(the question, then as much of each answer as fits)"})
    batch_size: int = field(default=4, metadata={"help": "pairs per rank per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    eval_batches: int = field(default=0, metadata={"help": "evaluate on eval_batches x batch_size pairs in all, "
                                                           "shared out among the ranks (0 = every pair)"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (cosine decay)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)"})
    lora: LoRAConfig | None = field(default=LoRAConfig(r=8, alpha=16.0, dropout=0.05,
                                                       targets=("q_proj", "k_proj", "v_proj", "o_proj")), metadata={
        "help": "train LoRA adapters on a frozen base; the base with adapters off is the reference",
        "prefix": "lora_"})

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("--data is required")
        if self.lora is None:
            raise ValueError("dpo needs LoRA (drop --no-lora): the reference is the policy with its adapters off, "
                             "so no second copy of the model is held")
        require_positive(self, "max_length", "batch_size", "grad_accum")
        require_non_negative(self, "max_steps", "eval_every", "eval_batches")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("need --epochs > 0 or --max-steps > 0")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("--label-smoothing applies to --loss sigmoid only")


class AnswerLogProbs(nn.Module):
    """Each row's summed log-probability of its answer tokens [N]: DDP wraps this. The LM head runs in
    chunks (kernels/logprobs.py), so no [N, L, vocab] tensor is kept for backward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask, answer):
        hidden = self.model.model(tokens, attention_mask=mask)[:, :-1]  # [N, L-1, dim]: position t predicts t+1
        logprobs = hidden_token_logprobs(hidden, self.model.lm_head.weight, tokens[:, 1:])  # [N, L-1]
        return (logprobs * answer[:, 1:]).sum(1)


def stack_answers(chosen, rejected, chosen_prompt, rejected_prompt, pad_id):
    """One right-padded [2B, L] batch, chosen rows first, its mask, and the answer mask (True on the
    tokens after each row's prompt), from token lists and prompt lengths."""
    tokens, mask = pad(list(chosen) + list(rejected), pad_id)
    prompt = torch.tensor(list(chosen_prompt) + list(rejected_prompt))
    return tokens, mask, mask & (torch.arange(tokens.shape[1]) >= prompt[:, None])


def pair_loss(cfg: DPOConfig, policy: nn.Module, model, tokens, mask, answer):
    """(loss, DPOStats, policy log-probs [2B]) of one batch of B pairs stacked as stack_answers does."""
    with torch.no_grad(), disable_lora(model), autocast(tokens.device, cfg.dtype):
        ref = AnswerLogProbs(model)(tokens, mask, answer)  # the same network and code path as the policy's
    with autocast(tokens.device, cfg.dtype):
        logprobs = policy(tokens, mask, answer)
    n, lengths = len(tokens) // 2, answer[:, 1:].sum(1).float()
    loss, stats = dpo_loss(logprobs[:n], logprobs[n:], ref[:n], ref[n:], beta=cfg.beta, loss=cfg.loss,
                           label_smoothing=cfg.label_smoothing, chosen_tokens=lengths[:n], rejected_tokens=lengths[n:])
    return loss, stats, logprobs.detach()


@torch.no_grad()
def evaluate(cfg: DPOConfig, policy: AnswerLogProbs, held: PairLoader, tok, dist: Dist) -> dict:
    """Held-out loss, implicit-reward accuracy and margin, and "the longer answer wins", on one global set
    of pairs (the first eval_batches x batch_size, or all): each rank scores a contiguous share. With
    intervals for the accuracy and for its difference from the rule's (eval/pair_accuracy.py)."""
    policy.eval()
    n_eval = min(len(held.chosen), cfg.eval_batches * cfg.batch_size) if cfg.eval_batches else len(held.chosen)
    first, last = dist.rank * n_eval // dist.world_size, (dist.rank + 1) * n_eval // dist.world_size
    sums = {name: torch.zeros((), dtype=torch.float64, device=dist.device)
            for name in ("pairs", "loss", "correct", "margin", "chosen_reward", "rejected_reward")}
    outcomes = []  # per pair: (the implicit reward ranks it right, the length rule does: 1, 1/2 on a tie, 0)
    for start in range(first, last, cfg.batch_size):
        rows = range(start, min(start + cfg.batch_size, last))
        chosen, rejected = [held.chosen[i] for i in rows], [held.rejected[i] for i in rows]
        tokens, mask, answer = stack_answers(chosen, rejected, [held.chosen_prompt[i] for i in rows],
                                             [held.rejected_prompt[i] for i in rows], tok.pad_id)
        loss, stats, _ = pair_loss(cfg, policy, policy.model, *(t.to(dist.device) for t in (tokens, mask, answer)))
        n = len(rows)
        longer = torch.tensor([held.chosen_length[i] - held.rejected_length[i] for i in rows]).sign().double()  # uncut
        for name, value in (("pairs", n), ("loss", loss.item() * n), ("correct", stats.accuracy.item() * n),
                            ("margin", stats.margin.item() * n), ("chosen_reward", stats.chosen_reward.sum().item()),
                            ("rejected_reward", stats.rejected_reward.sum().item())):
            sums[name] += value
        outcomes += zip((stats.chosen_reward > stats.rejected_reward).tolist(), ((longer + 1) / 2).tolist())  # tie: 1/2
    total = all_reduce_named(dist, sums)
    policy.train()
    n = max(total["pairs"], 1.0)
    return {"dpo/eval_loss": total["loss"] / n, "dpo/accuracy": total["correct"] / n, "dpo/margin": total["margin"] / n,
            "dpo/eval_chosen_reward": total["chosen_reward"] / n,
            "dpo/eval_rejected_reward": total["rejected_reward"] / n,
            "dpo/eval_pairs": int(total["pairs"]), **against_length_rule(dist, outcomes, "dpo")}


def train(cfg: DPOConfig, dist: Dist) -> dict:
    lock_run_folder(dist, cfg.out)  # this run's alone from here on; partial checkpoints of killed runs cleared
    measured_peaks(dist.device.type)  # MFU's denominator; measured before the model exists (off the peak memory)
    seed_everything(cfg.seed)
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    model = build_model(cfg.model, tok, dtype=cfg.dtype, lora=cfg.lora, load_in_8bit=cfg.load_in_8bit,
                        grad_checkpointing=cfg.grad_checkpointing, device=dist.device, seed=cfg.seed).train()
    if cfg.max_length > model.cfg.max_seq_len:
        raise ValueError(f"--max-length {cfg.max_length} is longer than the model's max_seq_len "
                         f"{model.cfg.max_seq_len} (--model {cfg.model})")

    data = pair_data(cfg, dist, tok, dpo=True)
    loader, held, pairs_per_step, max_steps = data

    policy = AnswerLogProbs(model)
    ddp = DDP(policy) if dist.enabled else policy
    if cfg.compile:
        ddp = torch.compile(ddp)
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay)

    guard = BadStepGuard(cfg.max_bad_steps, "dpo")
    start, resume_from = resume_if_asked(dist, cfg, model, cfg.lora, optimizer, loader, guard)
    # Built once the run is sure to go ahead: it drops the logged rows of the steps this run will redo.
    log = Logger(cfg.out, dist.is_main, config=asdict(cfg), resume_step=start)
    trainable, total = count_params(model)
    log.info(f"dpo: {total:,} parameters, {trainable:,} trainable (LoRA; the reference is the base with adapters "
             f"off), β {cfg.beta:g}, loss {cfg.loss}, world {dist.world_size}, device {dist.device}, dtype "
             f"{cfg.dtype}, {torch.get_num_threads()} threads per rank (OMP_NUM_THREADS)")
    log.info(f"dpo: {loader.stats.rank_pairs:,} training pairs ({dropped_or_cut(loader.stats, cfg)}), "
             f"{len(held.chosen):,} evaluation pairs ({dropped_or_cut(held.stats, cfg)}); {pairs_per_step} pairs per "
             f"step, {max_steps} steps")
    if resume_from:
        log.info(f"dpo: resumed from {resume_from} at step {start}")
    if cfg.warmup_steps > max_steps:
        log.warn(f"dpo: --warmup-steps {cfg.warmup_steps} is longer than the run ({max_steps} steps): the learning "
                 f"rate peaks at {cfg.lr * max_steps / cfg.warmup_steps:.3g} instead of --lr {cfg.lr:g}")

    def save(step):
        path = save_stage_checkpoint(dist, cfg, step, model, cfg.lora, tok, optimizer, loader, guard.count)
        log.info(f"dpo: saved {path}")

    # Per token: the policy's forward and backward plus the reference's forward, at a typical pair length.
    length = cfg.max_length // 2
    flops_token = (training_flops_per_token(model.cfg, length, full=False) +
                   forward_flops(model.cfg, length, length, causal_attended([length])) / length)
    metrics = {}
    for step in range(start, max_steps):
        t0 = time.time()
        lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        set_lr(optimizer, lr)
        if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
            ev = evaluate(cfg, policy, held, tok, dist)
            log.scalars(step, ev)
            log.info(f"dpo: step {step} eval loss {ev['dpo/eval_loss']:.4f}, implicit-reward accuracy "
                     f"{ev['dpo/accuracy']:.3f} (longer answer wins: {ev['dpo/longer_wins_accuracy']:.3f})")
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            save(step)

        batch = next_global_batch(data)
        first = dist.rank * cfg.grad_accum * cfg.batch_size
        sums = {}  # over this rank's micro-batches: sums over pairs, and tokens
        for m in range(cfg.grad_accum):
            rows = slice(first + m * cfg.batch_size, first + (m + 1) * cfg.batch_size)
            chosen, chosen_mask, rejected, rejected_mask, chosen_prompt, rejected_prompt = (t[rows] for t in batch)
            tokens, mask, answer = stack_answers(
                [t[k].tolist() for t, k in zip(chosen, chosen_mask)], [t[k].tolist() for t, k in zip(rejected,
                                                                                                  rejected_mask)],
                chosen_prompt.tolist(), rejected_prompt.tolist(), tok.pad_id)
            n = cfg.batch_size
            with grad_sync(dist, ddp, sync=m == cfg.grad_accum - 1):
                loss, stats, logprobs = pair_loss(cfg, ddp, model, tokens.to(dist.device), mask.to(dist.device),
                                                  answer.to(dist.device))
                (loss * n * dist.world_size / pairs_per_step).backward()
            micro_sums = {"loss": loss.detach() * n, "correct": stats.accuracy * n, "margin": stats.margin * n,
                          "chosen_reward": stats.chosen_reward.sum(), "rejected_reward": stats.rejected_reward.sum(),
                          "chosen_logprob": logprobs[:n].sum(), "rejected_logprob": logprobs[n:].sum(),
                          "tokens": mask.sum().to(loss.device) * 1.0}
            sums = {k: sums.get(k, 0) + v.double() for k, v in micro_sums.items()}
        total = all_reduce_named(dist, sums)
        per_pair = {k: v / pairs_per_step for k, v in total.items()}
        n_tokens, loss = total["tokens"], per_pair["loss"]
        grad_norm = clip_and_step(model, optimizer, step, loss, cfg.grad_clip, guard, log)
        if guard.count:
            continue
        dt = time.time() - t0
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "dpo/train_accuracy": per_pair["correct"], "dpo/train_margin": per_pair["margin"],
                   "dpo/chosen_reward": per_pair["chosen_reward"], "dpo/rejected_reward": per_pair["rejected_reward"],
                   "dpo/chosen_logprob": per_pair["chosen_logprob"],
                   "dpo/rejected_logprob": per_pair["rejected_logprob"],
                   "perf/pairs_per_s": pairs_per_step / dt, "perf/tokens_per_s": n_tokens / dt,
                   "perf/mfu": mfu(n_tokens / dt / dist.world_size, flops_token, dist.device, cfg.dtype,
                                   cfg.load_in_8bit),
                   "perf/peak_mem_gb": peak_memory_bytes(dist.device) / 2**30}
        due = step % cfg.log_every == 0 or step == max_steps - 1
        if due:
            log.scalars(step, metrics)
        log.line(step + 1, max_steps, {"loss": loss, "acc": per_pair["correct"], "margin": per_pair["margin"],
                                       "lr": lr, "tok/s": round(n_tokens / dt), "mfu": f"{metrics['perf/mfu']:.1%}"},
                 due=due)

    ev = evaluate(cfg, policy, held, tok, dist)
    log.scalars(max_steps, ev)
    log.info(f"dpo: final eval loss {ev['dpo/eval_loss']:.4f} (ln 2 = 0.6931 at the start) on {ev['dpo/eval_pairs']} "
             f"pairs, margin {ev['dpo/margin']:.3f}, chosen reward {ev['dpo/eval_chosen_reward']:+.3f}, rejected "
             f"{ev['dpo/eval_rejected_reward']:+.3f}; implicit-reward {rule_comparison_text(ev, 'dpo')}")
    if start < max_steps or not resume_from:
        save(max_steps)
    log.close()
    return {**metrics, **ev}
