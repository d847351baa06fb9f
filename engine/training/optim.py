"""AdamW over the trainable parameters and the learning-rate schedules the stages use.

Schedules are pure functions of the step (nothing to save on resume beyond the step itself).
Weight decay applies to matrices only, never to norms, biases or scalar heads' biases (nanoGPT).
"""
from __future__ import annotations

import math

import torch


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel over all tensors. Measured on llama-60m's 58M parameters, 1 CPU thread: 99 ms a step
    # against 638 ms for the default per-tensor loop (561 ms foreach), about 10% of a full-fine-tuning SFT step.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def linear_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up, then linear decay to min_lr at max_steps (StackLLaMA's reward-model schedule)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return max_lr + (min_lr - max_lr) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class BadStepGuard:
    """Counts consecutive non-finite steps; the caller skips them, and after `limit` in a row the run stops."""

    def __init__(self, limit: int, stage: str, count: int = 0):
        self.limit, self.stage, self.count = limit, stage, count

    def check(self, step: int, loss: float, grad_norm: float, log) -> bool:
        """True if the step is fine; False (after logging) if it must be skipped."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.count = 0
            return True
        self.count += 1
        log.warn(f"{self.stage}: step {step} has a non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                 f"skipped ({self.count} in a row)")
        log.scalars(step, {"train/skipped_steps": self.count})
        if self.count >= self.limit:
            raise RuntimeError(f"{self.stage}: {self.count} consecutive non-finite steps; stopping (lower --lr, "
                               "use fp32, or check the data)")
        return False


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, loss: float,
                  grad_clip: float, guard: BadStepGuard, log) -> float:
    """Clip the global gradient norm, then step, unless the loss or gradient is not finite (then the
    gradients are dropped). Returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf")).item()
    if guard.check(step, loss, grad_norm, log):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
