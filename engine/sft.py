"""Supervised fine-tuning (StackLLaMA step 1): next-token loss on packed "Question: … Answer: …" text.

The loop has nanoGPT's shape: lr, eval/save when due, micro-batches (gradient sync only on the last),
clip, step, log. Each step draws one *global* batch of world × grad_accum × batch_size packed rows
from a single seeded stream, and rank r trains on its slice, so a run's loss curve does not depend
on how the batch is split over ranks and accumulation steps. The loss is the sum of token losses
divided by the global token count (times world size, undoing DDP's gradient averaging). Evaluation
likewise reads one fixed global set of held-out rows that the ranks share out, so held-out loss and
perplexity do not depend on the world size either.

Defaults follow StackLLaMA's supervised_finetuning.py: seq 1024, LoRA r=16 α=32 dropout 0.05 on
q_proj/v_proj, lr 1e-5 cosine with 100 warm-up steps, weight decay 0.05.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from rlhf_engine.data.packing import PackedBatch, PackingLoader, document_causal_mask, make_documents, sft_documents
from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.engine.weights.builder import build_model, count_params, resolve_tokenizer
from rlhf_engine.engine.training.dist import Dist, all_reduce_named, all_reduce_sum, grad_sync
from rlhf_engine.engine.training.logging import Logger, peak_memory_bytes
from rlhf_engine.engine.training.optim import BadStepGuard, build_adamw, clip_and_step, cosine_lr, set_lr
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.training.roofline import measured_peaks, mfu, training_flops_per_token
from rlhf_engine.engine.training.stage_config import ScheduledStageConfig, require_non_negative, require_positive
from rlhf_engine.engine.training.train_state import (lock_run_folder, resume_if_asked, save_stage_checkpoint,
                                                     seed_everything)
from rlhf_engine.kernels.logprobs import hidden_token_logprobs


@dataclass(frozen=True)
class SFTConfig(ScheduledStageConfig):
    data: str = field(default=None, metadata={"help": "pairs data (parquet/jsonl file, folder or glob): the "
                                                      "finetune split"})
    eval_data: str | None = field(default=None, metadata={"help": "held-out pairs; default: every 20th "
                                                                   "document of --data is held out"})
    seq_len: int = field(default=1024, metadata={"help": "packed sequence length"})
    batch_size: int = field(default=4, metadata={"help": "packed sequences per rank per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=10000, metadata={"help": "optimizer steps"})
    eval_every: int = field(default=1000, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "evaluate on eval_batches x batch_size packed rows "
                                                            "in all, shared out among the ranks"})
    document_mask: bool = field(default=False, metadata={"help": "keep attention inside each packed document "
                                                                 "(StackLLaMA let it cross)"})
    # StackLLaMA's SFT settings where they differ from the shared defaults.
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)"})

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("--data is required")
        require_positive(self, "seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches")
        require_non_negative(self, "eval_every")


class CausalLMLoss(nn.Module):
    """Summed next-token loss: DDP wraps this, so one forward does everything that needs gradients.

    The LM head and log-softmax run chunk by chunk (kernels/logprobs.py), so the [B, T, vocab]
    float32 logits are never held whole: at vocab 32000 and seq 1024 that is 125 MiB per row.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, positions=None, mask=None):
        hidden = self.model.model(tokens, positions=positions, attention_mask=mask)
        return -hidden_token_logprobs(hidden, self.model.lm_head.weight, targets).sum()


def batch_inputs(batch, document_mask: bool, device):
    tokens, targets = batch.tokens.to(device), batch.targets.to(device)
    positions = batch.position_ids.to(device) if document_mask else None
    mask = document_causal_mask(batch.document_ids).to(device) if document_mask else None
    return tokens, targets, positions, mask


def held_out_rows(cfg: SFTConfig, docs, source: str) -> PackedBatch:
    """The evaluation set: the first eval_batches x batch_size packed rows of the held-out documents, in
    order. It is one global set, whatever the world size: each rank evaluates its share of it."""
    loader = PackingLoader(docs, seq_len=cfg.seq_len, batch_size=cfg.eval_batches * cfg.batch_size, infinite=False,
                           shuffle=False)
    rows = next(iter(loader), None)
    if rows is None:
        raise ValueError(f"{source}: the held-out documents hold {len(docs.tokens)} tokens, fewer than one "
                         f"packed row of --seq-len {cfg.seq_len} + 1")
    return rows


@torch.no_grad()
def evaluate(cfg: SFTConfig, loss_fn: nn.Module, rows: PackedBatch, dist: Dist) -> tuple[float, float]:
    """(loss, perplexity) on the held-out rows: each rank takes a contiguous share, in micro-batches, and
    the token-weighted sums are added up over ranks."""
    loss_fn.eval()
    n = rows.tokens.shape[0]
    first, last = dist.rank * n // dist.world_size, (dist.rank + 1) * n // dist.world_size
    loss_sum, n_tokens = torch.zeros((), dtype=torch.float64, device=dist.device), 0
    for start in range(first, last, cfg.batch_size):
        micro = PackedBatch(*(t[start:min(start + cfg.batch_size, last)] for t in rows))
        tokens, targets, positions, mask = batch_inputs(micro, cfg.document_mask, dist.device)
        with autocast(dist.device, cfg.dtype):
            loss_sum += loss_fn(tokens, targets, positions, mask).double()
        n_tokens += targets.numel()
    total = all_reduce_named(dist, {"loss": loss_sum, "tokens": loss_sum.new_tensor(n_tokens)})
    loss_fn.train()
    loss = total["loss"] / max(total["tokens"], 1.0)
    return loss, math.exp(min(loss, 50.0))


def split_documents(docs, every: int = 20):
    """Hold out every `every`-th document (deterministic) when no --eval-data is given."""
    pieces = np.split(docs.tokens, docs.offsets[1:-1])  # one array per document
    train = make_documents([p for d, p in enumerate(pieces) if d % every != every - 1])
    held = make_documents([p for d, p in enumerate(pieces) if d % every == every - 1])
    return train, held


def train(cfg: SFTConfig, dist: Dist) -> dict:
    lock_run_folder(dist, cfg.out)  # this run's alone from here on; partial checkpoints of killed runs cleared
    measured_peaks(dist.device.type)  # MFU's denominator; measured before the model exists (off the peak memory)
    seed_everything(cfg.seed)  # same initial weights on every rank
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    lora = cfg.lora
    model = build_model(cfg.model, tok, dtype=cfg.dtype, lora=lora, load_in_8bit=cfg.load_in_8bit,
                        grad_checkpointing=cfg.grad_checkpointing, device=dist.device, seed=cfg.seed).train()
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's max_seq_len {model.cfg.max_seq_len} "
                         f"(--model {cfg.model})")

    docs = sft_documents(read_pairs(cfg.data, min_rows=1), tok)
    if cfg.eval_data:
        train_docs, eval_docs = docs, sft_documents(read_pairs(cfg.eval_data, min_rows=1), tok)
    else:
        train_docs, eval_docs = split_documents(docs)
        if len(eval_docs.offsets) == 1:
            raise ValueError(f"{cfg.data}: {len(docs.offsets) - 1} documents, too few to hold every 20th out for "
                             "evaluation; pass --eval-data")
    eval_rows = held_out_rows(cfg, eval_docs, cfg.eval_data or cfg.data)
    rows_per_step = dist.world_size * cfg.grad_accum * cfg.batch_size
    loader = PackingLoader(train_docs, seq_len=cfg.seq_len, batch_size=rows_per_step, seed=cfg.seed)

    loss_fn = CausalLMLoss(model)
    ddp = DDP(loss_fn) if dist.enabled else loss_fn
    if cfg.compile:
        ddp = torch.compile(ddp)
    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay)

    guard = BadStepGuard(cfg.max_bad_steps, "sft")
    start, resume_from = resume_if_asked(dist, cfg, model, lora, optimizer, loader, guard)
    # Built once the run is sure to go ahead: it drops the logged rows of the steps this run will redo.
    log = Logger(cfg.out, dist.is_main, config=asdict(cfg), resume_step=start)
    trainable, total = count_params(model)
    log.info(f"sft: {total:,} parameters, {trainable:,} trainable ({'LoRA' if lora else 'full'}), "
             f"world {dist.world_size}, device {dist.device}, dtype {cfg.dtype}, {torch.get_num_threads()} threads "
             "per rank (OMP_NUM_THREADS)")
    log.info(f"sft: {len(train_docs.offsets) - 1:,} training documents ({len(train_docs.tokens):,} tokens), "
             f"{len(eval_docs.offsets) - 1:,} held out ({eval_rows.tokens.shape[0]} rows evaluated); "
             f"{rows_per_step} x {cfg.seq_len} tokens per step")
    if resume_from:
        log.info(f"sft: resumed from {resume_from} at step {start}")
    if cfg.warmup_steps > cfg.max_steps:
        log.warn(f"sft: --warmup-steps {cfg.warmup_steps} is longer than the run (--max-steps {cfg.max_steps}): the "
                 f"learning rate peaks at {cfg.lr * cfg.max_steps / cfg.warmup_steps:.3g} instead of --lr {cfg.lr:g}")

    def save(step):
        path = save_stage_checkpoint(dist, cfg, step, model, lora, tok, optimizer, loader, guard.count)
        log.info(f"sft: saved {path}")

    flops_token = training_flops_per_token(model.cfg, cfg.seq_len, full=lora is None)
    batches = iter(loader)
    metrics = {}
    for step in range(start, cfg.max_steps):
        t0 = time.time()
        lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        set_lr(optimizer, lr)
        # Step 0 too, on a fresh run: the base's held-out loss is what the run is judged against.
        if cfg.eval_every and step % cfg.eval_every == 0 and (step > 0 or not resume_from):
            eval_loss, ppl = evaluate(cfg, loss_fn, eval_rows, dist)
            log.scalars(step, {"eval/loss": eval_loss, "eval/ppl": ppl})
            log.info(f"sft: step {step} eval loss {eval_loss:.4f} ppl {ppl:.2f}")
        if cfg.save_every and step % cfg.save_every == 0 and step > start:
            save(step)

        # Micro-batches: this rank's rows of the global batch, in grad_accum slices.
        batch = next(batches)
        first = dist.rank * cfg.grad_accum * cfg.batch_size
        n_tokens = rows_per_step * cfg.seq_len  # packed rows: every position is a real target
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        for m in range(cfg.grad_accum):
            rows = slice(first + m * cfg.batch_size, first + (m + 1) * cfg.batch_size)
            micro = type(batch)(*(t[rows] for t in batch))
            tokens, targets, positions, mask = batch_inputs(micro, cfg.document_mask, dist.device)
            with grad_sync(dist, ddp, sync=m == cfg.grad_accum - 1):
                with autocast(dist.device, cfg.dtype):
                    micro_loss = ddp(tokens, targets, positions, mask)
                (micro_loss * dist.world_size / n_tokens).backward()
            loss_sum += micro_loss.detach().double()
        loss = (all_reduce_sum(dist, loss_sum) / n_tokens).item()
        grad_norm = clip_and_step(model, optimizer, step, loss, cfg.grad_clip, guard, log)
        if guard.count:
            continue

        dt = time.time() - t0
        tokens_per_s = n_tokens / dt
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "perf/tokens_per_s": tokens_per_s,
                   "perf/mfu": mfu(tokens_per_s / dist.world_size, flops_token, dist.device, cfg.dtype,
                                   cfg.load_in_8bit),
                   "perf/peak_mem_gb": peak_memory_bytes(dist.device) / 2**30}
        due = step % cfg.log_every == 0 or step == cfg.max_steps - 1
        if due:
            log.scalars(step, metrics)
        log.line(step + 1, cfg.max_steps, {"loss": loss, "lr": lr, "tok/s": round(tokens_per_s),
                                           "mfu": f"{metrics['perf/mfu']:.1%}"}, due=due)

    eval_loss, ppl = evaluate(cfg, loss_fn, eval_rows, dist)
    log.scalars(cfg.max_steps, {"eval/loss": eval_loss, "eval/ppl": ppl})
    log.info(f"sft: final eval loss {eval_loss:.4f} ppl {ppl:.2f}")
    if start < cfg.max_steps or not resume_from:
        save(cfg.max_steps)
    log.close()
    return {**metrics, "eval/loss": eval_loss, "eval/ppl": ppl}
