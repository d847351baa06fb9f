"""LoRA's update with dropout, (α/r)·B·A·dropout(x), keeping x and a bool mask for backward.

Written as `linear(linear(dropout(x), A), B) * scale`, autograd keeps dropout's noise (a float tensor on CPU;
CUDA's fused dropout keeps a byte mask) and the dropped copy of x (for A's gradient): on CPU two float copies of
the input per adapted layer. The Function below keeps x itself, which q_proj's and v_proj's adapters share (the
same normed hidden state, when it needs no cast to the adapters' dtype), and a one-byte keep mask: at SmolLM2's
SFT shape on CPU (4 × 512 tokens, dim 576, q and v adapted) that is 6.8 MB a layer instead of 18, 340 MB less
over 30 layers; on CUDA one float copy a layer less. The keep-scale 1/(1-p) moves from the [tokens, dim]
input to the [tokens, r] product (the same value, rounded at another place: equal to the reference within
fp32 round-off, tested with the same mask). Dropout off (eval, p = 0), no gradient wanted, or autocast (bf16
training on a GPU, where the matmuls pick their dtypes): the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def available() -> bool:
    """Plain torch: every device."""
    return True


def reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float,
              training: bool) -> torch.Tensor:
    """The definition, as PEFT computes it: x [..., in], lora_a [r, in], lora_b [out, r] -> [..., out]."""
    return F.linear(F.linear(F.dropout(x, p, training), lora_a), lora_b) * scaling


class _LoRAUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, lora_b, keep_mask, scaling, keep):
        h = F.linear(x * keep_mask, lora_a).mul_(1.0 / keep)  # [..., r]: A·dropout(x)
        ctx.save_for_backward(x, lora_a, lora_b, keep_mask, h)
        ctx.scaling, ctx.keep = scaling, keep
        return F.linear(h, lora_b) * scaling

    @staticmethod
    @torch.autograd.function.once_differentiable  # gradients built from the saved h: no double backward
    def backward(ctx, grad):
        x, lora_a, lora_b, keep_mask, h = ctx.saved_tensors
        want_x, want_a, want_b = ctx.needs_input_grad[:3]
        grad2 = grad.reshape(-1, grad.shape[-1])  # [n, out]
        grad_b = (grad2.t() @ h.reshape(-1, h.shape[-1])).mul_(ctx.scaling) if want_b else None  # [out, r]
        grad_x = grad_a = None
        if want_x or want_a:
            grad_h = (grad2 @ lora_b).mul_(ctx.scaling / ctx.keep)  # [n, r], dropout's keep-scale folded in
            if want_a:
                dropped = (x * keep_mask).reshape(-1, x.shape[-1])  # recomputed: one multiply, not kept
                grad_a = grad_h.t() @ dropped  # [r, in]
            if want_x:
                grad_x = (grad_h @ lora_a).reshape(x.shape).mul_(keep_mask)
        return grad_x, grad_a, grad_b, None, None, None


def lora_update(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float,
                training: bool) -> torch.Tensor:
    """(α/r)·B·A·dropout(x); with dropout on and a gradient wanted, through the Function that keeps x and a
    bool mask. Under autocast the reference runs (its matmuls pick their dtypes there)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {p!r}")
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    if not (training and p > 0 and wants_grad) or torch.is_autocast_enabled(x.device.type):
        return reference(x, lora_a, lora_b, scaling, p, training)
    keep_mask = torch.rand(x.shape, device=x.device) >= p  # faster on CPU than a bool bernoulli_
    return _LoRAUpdate.apply(x, lora_a, lora_b, keep_mask, scaling, 1.0 - p)
