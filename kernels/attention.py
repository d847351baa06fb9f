"""Causal self-attention on CPU in float32 as blocked batched matmuls, faster than torch's CPU flash kernel on
long rows.

torch's CPU flash attention (`F.scaled_dot_product_attention`, the kernel both this engine and transformers
call) runs its float32 products at ~60 GFLOP/s on the AVX-512 EPYC, its backward slower still: over SFT's
4 x 512 tokens at SmolLM2's 9 query heads over 3 key/value heads, 16 ms forward and 41 ms backward a layer,
a fifth to a quarter of an SFT or RM step. The same products as torch.bmm on whole blocks run at 150-180
GFLOP/s. So:
  reference  F.scaled_dot_product_attention(is_causal=True), any device and dtype.
  blocked    queries in blocks of BLOCK positions; block i attends to keys [0, end of block i) in one
             batched matmul (the causal upper triangle is skipped block by block, masked only on the
             diagonal block), an in-place softmax, then one matmul by V. Backward recomputes each block's
             probabilities, as flash attention does, so it keeps only q, k, v and the output: five matmuls
             a block, no [T, T] tensor kept. 4 x 512: 57 -> 43 ms forward + backward (1.32x), 1 x 512 1.33x.
A key/value head serves its g = H / KV query heads in the same matmul (grouped-query attention): queries are
laid out [B, KV, T, g, d] so one block's rows of every head of a group are one contiguous matrix.
Float32 CPU tensors from MIN_LENGTH positions with autocast off take `blocked` (below it the dozen ops a block
cost more than flash's fused loop: 1 x 256 0.81x forward); everything else, and everything under torch.compile,
the reference. (llama.attend runs CPU attention under autocast in float32, autocast off, so bf16 runs take it.) bench/causal_attention.py has the table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64  # query positions per block: rows of g x BLOCK per matmul (192 for SmolLM2's 9 over 3 heads)
MIN_LENGTH = 320  # shorter sequences stay on the flash kernel (level or slower at 256: bench/causal_attention.py)


def available() -> bool:
    """Plain torch: every CPU."""
    return True


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, H, T, d] over k, v [B, KV, T, d] (KV divides H) -> [B, H, T, d]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def uses_blocked(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether causal_attention(q, k, v) takes the blocked path: float32 CPU self-attention (as many keys as
    queries) of at least MIN_LENGTH positions, autocast off, outside torch.compile."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k.dtype == torch.float32 and q.dim() == 4
            and q.shape[2] == k.shape[2] >= MIN_LENGTH and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _blocks(T: int):
    return [(start, min(start + BLOCK, T)) for start in range(0, T, BLOCK)]


def _diagonal_mask(n: int, g: int, device) -> torch.Tensor:
    """[n * g, n] True where a query row (position r // g of the block, one of g heads) may not see the key:
    keys after it inside its own block."""
    position = torch.arange(n, device=device).repeat_interleave(g)
    return torch.arange(n, device=device)[None, :] > position[:, None]


def _probabilities(q_block, k, start: int, end: int, g: int):
    """Softmax probabilities of one query block (scaled) [BK, n * g, d] over keys [0, end): [BK, n * g, end],
    zero on the block's own later keys. The softmax runs in place (aten's out= form: one pass fewer than
    torch.softmax's fresh tensor)."""
    scores = torch.bmm(q_block, k[:, :end].transpose(1, 2))
    scores[:, :, start:end].masked_fill_(_diagonal_mask(end - start, g, q_block.device), float("-inf"))
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


class _BlockedCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, d = q.shape
        KV = k.shape[1]
        g = H // KV
        # [B, H, T, d] -> [B, KV, T, g, d] -> [B*KV, T*g, d]: block rows are (position, head of the group); the
        # softmax scale goes on the queries (T*g*d multiplies, not T*g*T), written straight into that layout
        qg = torch.empty(B, KV, T, g, d, dtype=q.dtype, device=q.device)
        torch.mul(q.view(B, KV, g, T, d).transpose(2, 3), d**-0.5, out=qg)
        qg = qg.view(B * KV, T * g, d)
        kf, vf = k.reshape(B * KV, T, d), v.reshape(B * KV, T, d)
        out = torch.empty_like(qg)
        for start, end in _blocks(T):
            rows = slice(start * g, end * g)
            torch.bmm(_probabilities(qg[:, rows], kf, start, end, g), vf[:, :end], out=out[:, rows])
        result = out.view(B, KV, T, g, d).transpose(2, 3).reshape(B, H, T, d)  # a copy unless g == 1
        if any(ctx.needs_input_grad):
            # Backward recomputes each block's probabilities: only q, k, v and the output are kept.
            ctx.save_for_backward(qg, kf, vf, out)
            ctx.shape = (B, H, KV, T, d)
            if g == 1:  # the caller may edit its output in place, as SDPA's allows: not the saved one
                result = result.clone()
        return result

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qg, kf, vf, out = ctx.saved_tensors
        B, H, KV, T, d = ctx.shape
        g = H // KV
        grad = grad.reshape(B, KV, g, T, d).transpose(2, 3).reshape(B * KV, T * g, d)
        delta = (grad * out).sum(-1, keepdim=True)  # [BK, T*g, 1]: rowsum(dO * O), the softmax backward's shift
        grad_q, grad_k, grad_v = torch.empty_like(qg), torch.zeros_like(kf), torch.zeros_like(vf)
        for start, end in _blocks(T):
            rows = slice(start * g, end * g)
            q_block, grad_block = qg[:, rows], grad[:, rows]
            probs = _probabilities(q_block, kf, start, end, g)
            grad_v[:, :end] += torch.bmm(probs.transpose(1, 2), grad_block)  # dV += Pᵀ dO
            grad_scores = torch.bmm(grad_block, vf[:, :end].transpose(1, 2))  # dP = dO Vᵀ
            grad_scores.sub_(delta[:, rows]).mul_(probs)  # dS = P (dP - delta), on the scaled scores
            torch.bmm(grad_scores, kf[:, :end], out=grad_q[:, rows])  # dQ = dS K (times the scale, below)
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q_block)  # dK += dSᵀ (scale Q)
        grad_q = grad_q.mul_(d**-0.5).view(B, KV, T, g, d).transpose(2, 3).reshape(B, H, T, d)
        return grad_q, grad_k.view(B, KV, T, d), grad_v.view(B, KV, T, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of q [B, H, T, d] over k, v [B, KV, T, d] -> [B, H, T, d]: blocked where
    `uses_blocked`, else the reference."""
    if not uses_blocked(q, k):
        return reference(q, k, v)
    return _BlockedCausal.apply(q, k, v)
