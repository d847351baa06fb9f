"""Reward model (StackLLaMA step 2): a scalar head read at the last real token, trained on answer pairs
with InstructGPT's loss −log σ(r_chosen − r_rejected).

Chosen and rejected sequences go through one forward as one batch (both right-padded to the longer
side). As in SFT, each step draws one global batch of pairs and rank r trains on its slice, so the
loss curve does not depend on the world size. Evaluation reports accuracy (r_chosen > r_rejected) on
the `evaluation` split next to the trivial "longer answer wins" rule, so users see what the model
adds over answer length.

Defaults follow StackLLaMA's reward_modeling.py: LoRA r=8 α=32 dropout 0.1, lr 2e-5 with linear
decay, 4 pairs per rank, max length 512, one epoch.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf_engine.data.loaders import PairLoader, pad
from rlhf_engine.engine.weights.builder import build_model, count_params, resolve_tokenizer
from rlhf_engine.engine.training.dist import Dist, all_reduce_named, grad_sync
from rlhf_engine.engine.training.logging import Logger, peak_memory_bytes
from rlhf_engine.engine.model.lora import LoRAConfig
from rlhf_engine.engine.eval.pair_accuracy import against_length_rule, rule_comparison_text
from rlhf_engine.engine.training.pair_data import dropped_or_cut, next_global_batch, pair_data
from rlhf_engine.engine.training.optim import BadStepGuard, build_adamw, clip_and_step, linear_lr, set_lr
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.rl.reward import PairScores
from rlhf_engine.engine.rl.rlhf_math import pairwise_loss
from rlhf_engine.engine.training.roofline import measured_peaks, mfu, training_flops_per_token
from rlhf_engine.engine.training.stage_config import ScheduledStageConfig, require_non_negative, require_positive
from rlhf_engine.engine.training.train_state import (lock_run_folder, resume_if_asked, save_stage_checkpoint,
                                                     seed_everything)


@dataclass(frozen=True)
class RMConfig(ScheduledStageConfig):
    data: str = field(default=None, metadata={"help": "pairs data (parquet/jsonl file, folder or glob): the "
                                                      "reward split"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out pairs (the evaluation split); "
                                                                   "default: every 20th pair of --data"})
    max_length: int = field(default=512, metadata={"help": "drop pairs where either side is longer (tokens; "
                                                                "--truncate cuts them instead)"})
    truncate: bool = field(default=False, metadata={
        "help": "cut pairs longer than --max-length to their first max-length tokens instead of dropping them "
                "(the question, then as much of each answer as fits)"})
    batch_size: int = field(default=4, metadata={"help": "pairs per rank per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0: from --epochs)"})
    eval_every: int = field(default=500, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    eval_batches: int = field(default=0, metadata={"help": "evaluate on eval_batches x batch_size pairs in all, "
                                                           "shared out among the ranks (0 = every pair)"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (linear decay)"})
    lora: LoRAConfig | None = field(default=LoRAConfig(r=8, dropout=0.1), metadata={
        "help": "train LoRA adapters and the score head on a frozen base (--no-lora: full fine-tuning)",
        "prefix": "lora_"})

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("--data is required")
        require_positive(self, "max_length", "batch_size", "grad_accum")
        require_non_negative(self, "max_steps", "eval_every", "eval_batches")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("need --epochs > 0 or --max-steps > 0")


def stack_pairs(chosen, chosen_mask, rejected, rejected_mask, pad_id):
    """One right-padded [2B, L] batch: chosen rows first, then rejected."""
    rows = [t[m].tolist() for t, m in zip(chosen, chosen_mask)] + [t[m].tolist() for t, m in zip(rejected,
                                                                                                  rejected_mask)]
    return pad(rows, pad_id)


@torch.no_grad()
def evaluate(cfg: RMConfig, scorer: nn.Module, held: PairLoader, tok, dist: Dist) -> dict:
    """Accuracy, loss and margin of the model, and the accuracy of "the longer answer wins", on one global
    set of held-out pairs (the first eval_batches x batch_size, or all): each rank scores a contiguous share.
    With intervals for the accuracy and for its difference from the rule's (eval/pair_accuracy.py)."""
    scorer.eval()
    n_eval = min(len(held.chosen), cfg.eval_batches * cfg.batch_size) if cfg.eval_batches else len(held.chosen)
    first, last = dist.rank * n_eval // dist.world_size, (dist.rank + 1) * n_eval // dist.world_size
    sums = {name: torch.zeros((), dtype=torch.float64, device=dist.device)
            for name in ("pairs", "loss", "correct", "margin")}
    outcomes = []  # per pair: (the model ranks it right, the length rule does: 1, 1/2 on a tie, 0)
    for start in range(first, last, cfg.batch_size):
        rows = range(start, min(start + cfg.batch_size, last))
        chosen, rejected = [held.chosen[i] for i in rows], [held.rejected[i] for i in rows]
        tokens, mask = pad(chosen + rejected, tok.pad_id)  # [2B, L], chosen rows first (as stack_pairs)
        with autocast(dist.device, cfg.dtype):
            scores = scorer(tokens.to(dist.device), mask.to(dist.device))
        n = len(rows)
        loss, stats = pairwise_loss(scores[:n], scores[n:])
        length_gap = torch.tensor([held.chosen_length[i] - held.rejected_length[i] for i in rows])  # uncut lengths
        longer = length_gap.sign().double()  # +1 chosen longer
        sums["pairs"] += n
        sums["loss"] += loss.item() * n
        sums["correct"] += stats.accuracy.item() * n
        sums["margin"] += stats.margin.item() * n
        outcomes += zip((scores[:n] > scores[n:]).tolist(), ((longer + 1) / 2).tolist())  # a tie counts half
    total = all_reduce_named(dist, sums)
    scorer.train()
    n = max(total["pairs"], 1.0)
    return {"rm/eval_loss": total["loss"] / n, "rm/accuracy": total["correct"] / n, "rm/margin": total["margin"] / n,
            "rm/eval_pairs": int(total["pairs"]), **against_length_rule(dist, outcomes, "rm")}


def train(cfg: RMConfig, dist: Dist) -> dict:
    lock_run_folder(dist, cfg.out)  # this run's alone from here on; partial checkpoints of killed runs cleared
    measured_peaks(dist.device.type)  # MFU's denominator; measured before the model exists (off the peak memory)
    seed_everything(cfg.seed)
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    lora = cfg.lora
    model = build_model(cfg.model, tok, head="score", dtype=cfg.dtype, lora=lora, load_in_8bit=cfg.load_in_8bit,
                        grad_checkpointing=cfg.grad_checkpointing, device=dist.device, seed=cfg.seed).train()
    if cfg.max_length > model.cfg.max_seq_len:
        raise ValueError(f"--max-length {cfg.max_length} is longer than the model's max_seq_len "
                         f"{model.cfg.max_seq_len} (--model {cfg.model})")

    data = pair_data(cfg, dist, tok)
    loader, held, pairs_per_step, max_steps = data

    scorer = PairScores(model)
    ddp = DDP(scorer) if dist.enabled else scorer
    if cfg.compile:
        ddp = torch.compile(ddp)
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay)

    guard = BadStepGuard(cfg.max_bad_steps, "rm")
    start, resume_from = resume_if_asked(dist, cfg, model, lora, optimizer, loader, guard)
    # Built once the run is sure to go ahead: it drops the logged rows of the steps this run will redo.
    log = Logger(cfg.out, dist.is_main, config=asdict(cfg), resume_step=start)
    trainable, total = count_params(model)
    log.info(f"rm: {total:,} parameters, {trainable:,} trainable ({'LoRA + score head' if lora else 'full'}), "
             f"world {dist.world_size}, device {dist.device}, dtype {cfg.dtype}, {torch.get_num_threads()} threads "
             "per rank (OMP_NUM_THREADS)")
    log.info(f"rm: {loader.stats.rank_pairs:,} training pairs ({dropped_or_cut(loader.stats, cfg)}), "
             f"{len(held.chosen):,} evaluation pairs ({dropped_or_cut(held.stats, cfg)}); {pairs_per_step} pairs per "
             f"step, {max_steps} steps")
    if resume_from:
        log.info(f"rm: resumed from {resume_from} at step {start}")
    if cfg.warmup_steps > max_steps:
        log.warn(f"rm: --warmup-steps {cfg.warmup_steps} is longer than the run ({max_steps} steps): the learning "
                 f"rate peaks at {cfg.lr * max_steps / cfg.warmup_steps:.3g} instead of --lr {cfg.lr:g}")

    def save(step):
        path = save_stage_checkpoint(dist, cfg, step, model, lora, tok, optimizer, loader, guard.count)
        log.info(f"rm: saved {path}")

    # Attention FLOPs at a typical pair length; the 6N-style terms dominate at RM sequence lengths.
    flops_token = training_flops_per_token(model.cfg, cfg.max_length // 2, full=lora is None, lm_head=False)
    metrics = {}
    for step in range(start, max_steps):
        t0 = time.time()
        lr = linear_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, max_steps)
        set_lr(optimizer, lr)
        if cfg.eval_every and step % cfg.eval_every == 0 and step > 0:
            ev = evaluate(cfg, scorer, held, tok, dist)
            log.scalars(step, ev)
            log.info(f"rm: step {step} eval accuracy {ev['rm/accuracy']:.3f} (longer answer wins: "
                     f"{ev['rm/longer_wins_accuracy']:.3f})")
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            save(step)

        batch = next_global_batch(data)
        first = dist.rank * cfg.grad_accum * cfg.batch_size
        sums = {}  # over this rank's micro-batches: loss, correct pairs, margin (sums over pairs), tokens
        for m in range(cfg.grad_accum):
            rows = slice(first + m * cfg.batch_size, first + (m + 1) * cfg.batch_size)
            tokens, mask = stack_pairs(*(t[rows] for t in batch[:4]), tok.pad_id)  # tokens and masks of both sides
            with grad_sync(dist, ddp, sync=m == cfg.grad_accum - 1):
                with autocast(dist.device, cfg.dtype):
                    scores = ddp(tokens.to(dist.device), mask.to(dist.device))
                n = cfg.batch_size
                loss, stats = pairwise_loss(scores[:n], scores[n:])  # mean over this micro-batch's pairs
                (loss * n * dist.world_size / pairs_per_step).backward()
            micro_sums = {"loss": loss.detach() * n, "correct": stats.accuracy * n, "margin": stats.margin * n,
                          "tokens": mask.sum().to(loss.device) * 1.0}
            sums = {k: sums.get(k, 0) + v.double() for k, v in micro_sums.items()}
        total = all_reduce_named(dist, sums)
        n_tokens, loss = total["tokens"], total["loss"] / pairs_per_step
        accuracy, margin = total["correct"] / pairs_per_step, total["margin"] / pairs_per_step
        grad_norm = clip_and_step(model, optimizer, step, loss, cfg.grad_clip, guard, log)
        if guard.count:
            continue
        dt = time.time() - t0
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "rm/train_accuracy": accuracy, "rm/train_margin": margin,
                   "perf/pairs_per_s": pairs_per_step / dt, "perf/tokens_per_s": n_tokens / dt,
                   "perf/mfu": mfu(n_tokens / dt / dist.world_size, flops_token, dist.device, cfg.dtype,
                                   cfg.load_in_8bit),
                   "perf/peak_mem_gb": peak_memory_bytes(dist.device) / 2**30}
        due = step % cfg.log_every == 0 or step == max_steps - 1
        if due:
            log.scalars(step, metrics)
        log.line(step + 1, max_steps, {"loss": loss, "acc": accuracy, "lr": lr, "tok/s": round(n_tokens / dt),
                                       "mfu": f"{metrics['perf/mfu']:.1%}"}, due=due)

    ev = evaluate(cfg, scorer, held, tok, dist)
    log.scalars(max_steps, ev)
    log.info(f"rm: final eval on {ev['rm/eval_pairs']} pairs: loss {ev['rm/eval_loss']:.4f}, margin "
             f"{ev['rm/margin']:.3f}, {rule_comparison_text(ev, 'rm')}")
    if start < max_steps or not resume_from:
        save(max_steps)
    log.close()
    return {**metrics, **ev}
