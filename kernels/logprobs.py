"""Per-token log-probabilities log softmax(z / T)[token] and entropies -sum p log p, from logits or hidden states.

PPO and the KL penalty need, for every position, the log-probability of one token and (for logging and
an optional bonus) the entropy; never the full [B, T, V] log-softmax. Building it costs 4·B·T·V bytes
(float32 at vocab 32000, B·T = 2048: 262 MB), and autograd keeps it plus the softmax until backward.
Here the B·T rows are processed in chunks by a custom autograd Function. Its backward reuses each chunk's
float32 log-softmax block saved by the forward while they fit in SAVE_BYTES in all, and otherwise
recomputes the block from the chunk's input and the saved per-row logsumexp; either way only [chunk, V]
buffers beyond the saved blocks are alive at once. From hidden states [B, T, D] and the LM-head weight
[V, D] the logits never exist whole either (the "fused linear cross-entropy" trick of Liger-Kernel and
Apple's Cut Cross-Entropy, Wijmans et al. 2024, here in plain chunked torch). Softmax math runs in
float32 (float64 inputs stay float64); the hidden-state matmul runs in the input dtype, exactly as
`lm_head(hidden)` would.

Temperature divides the logits first: PPO scores samples drawn at temperature T under that same
distribution (TRL's PPOTrainer does `logits /= temperature` before its log-softmax). There is no
top-k/top-p here: PPO refuses them, because the policy it scores is the full distribution.
bench/logprobs.py measures time and peak memory against the reference (docs/BENCHMARKS.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_engine.kernels.linear import input_grad, linear

CHUNK_BYTES = 64 * 2**20  # default chunk: this many bytes of float32 [chunk, V] buffer (512 rows at V = 32000)
# Up to this many bytes of float32 log-softmax blocks are kept from forward for backward, which then
# skips recomputing them (from hidden states, the LM-head matmul again). Larger inputs recompute: memory
# stays one [N, V] buffer at most, against autograd's several of a plain log_softmax. 512 MiB covers SFT at
# 4 x 512 tokens on SmolLM2's 49,152 pieces (403 MB) when the head trains; a frozen head keeps d logprob /
# d hidden instead (below).
SAVE_BYTES = 512 * 2**20
# Row-wise reductions over a block (logsumexp, entropy, KL) run over slices of its rows whose temporaries
# stay this small. A fresh [n, V] buffer above glibc's mmap threshold (32 MiB at most) is new pages from
# the kernel on every call, and on the VM this was measured on, faulting them in cost ~10x the arithmetic:
# torch.logsumexp on a [341, 49152] block took 67 ms in its [n, V] subtraction against 5 ms for its exp.
SLICE_BYTES = 4 * 2**20


def available() -> bool:
    """The chunked path is plain torch and runs on every device; a fused (e.g. Triton) kernel would gate here."""
    return True


# ---- reference: the definition, in plain torch -----------------------------------------------------

def reference(logits, tokens, temperature: float = 1.0):
    """(logprobs, entropy), each [B, T], from logits [B, T, V] and tokens [B, T]; builds the full log-softmax."""
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)  # [B, T, V]
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def hidden_reference(hidden, lm_head_weight, tokens, temperature: float = 1.0):
    """reference() on the logits F.linear(hidden [B, T, D], lm_head_weight [V, D])."""
    return reference(F.linear(hidden, lm_head_weight), tokens, temperature)


# ---- public API (the dispatcher) ------------------------------------------------------------------

def token_logprobs(logits, tokens, temperature: float = 1.0, chunk_size: int | None = None):
    """Log-probabilities [B, T] (float32) of tokens [B, T] under softmax(logits [B, T, V] / temperature)."""
    return token_logprobs_and_entropy(logits, tokens, temperature, chunk_size, with_entropy=False)[0]


def token_logprobs_and_entropy(logits, tokens, temperature: float = 1.0, chunk_size: int | None = None,
                               with_entropy: bool = True):
    """(logprobs, entropy), each [B, T] float32; differentiable with respect to logits."""
    return _dispatch(logits, None, tokens, temperature, chunk_size, with_entropy)


def hidden_token_logprobs(hidden, lm_head_weight, tokens, temperature: float = 1.0, with_entropy: bool = False,
                          chunk_size: int | None = None):
    """Like token_logprobs on F.linear(hidden [B, T, D], lm_head_weight [V, D]) without ever holding those logits.

    Returns logprobs [B, T], or (logprobs, entropy) with with_entropy; gradients reach hidden and the weight.
    """
    out = _dispatch(hidden, lm_head_weight, tokens, temperature, chunk_size, with_entropy)
    return out if with_entropy else out[0]


class TokenStatsWithReference(NamedTuple):
    logprobs: torch.Tensor  # [B, T] float32, bit-identical to hidden_token_logprobs' on the same inputs
    entropy: torch.Tensor  # [B, T]
    ref_logprobs: torch.Tensor  # [B, T] under the reference
    kl: torch.Tensor  # [B, T] exact KL(π‖π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)) at each position


@torch.no_grad()
def hidden_logprobs_with_reference(hidden, lm_head_weight, ref_hidden, ref_lm_head_weight, tokens,
                                   temperature: float = 1.0, chunk_size: int | None = None) -> TokenStatsWithReference:
    """PPO's rollout in one pass over the vocabulary: the policy's log-probs and entropy exactly as
    hidden_token_logprobs computes them (the same blocks and ops, so the first minibatch's ratio stays
    exactly 1), the reference's log-probs, and the exact per-position KL, with one [chunk, V] block of
    each model alive at a time instead of two [B, T, V] log-softmax tensors. hidden, ref_hidden [B, T, D]."""
    _check(hidden, tokens, temperature)
    B, T = tokens.shape
    vocab = lm_head_weight.shape[0]
    chunk = chunk_size or max(1, CHUNK_BYTES // (4 * vocab))
    out = TokenStatsWithReference(*(torch.empty(B, T, dtype=_compute_dtype(hidden), device=hidden.device)
                                    for _ in range(4)))
    mm_dtype, ref_mm_dtype = _matmul_dtype(hidden, lm_head_weight), _matmul_dtype(ref_hidden, ref_lm_head_weight)
    head, ref_head = lm_head_weight.to(mm_dtype), ref_lm_head_weight.to(ref_mm_dtype)  # cast once, not per block
    for bs, ts in _blocks(B, T, chunk):
        tok = tokens[bs, ts].reshape(-1, 1)  # [n, 1]
        shape = out.logprobs[bs, ts].shape
        _, logp = _block_log_softmax(hidden[bs, ts], head, temperature, mm_dtype)  # [n, V]
        _, ref_logp = _block_log_softmax(ref_hidden[bs, ts], ref_head, temperature, ref_mm_dtype)
        out.logprobs[bs, ts] = logp.gather(1, tok).view(shape)
        out.ref_logprobs[bs, ts] = ref_logp.gather(1, tok).view(shape)
        out.entropy[bs, ts] = _row_entropy(logp).view(shape)
        log_ratio = ref_logp.neg_().add_(logp)  # in place: ref_logp is not needed again
        kl = torch.empty(len(logp), dtype=logp.dtype, device=logp.device)
        for rows in _row_slices(logp):
            kl[rows] = (logp[rows].exp() * log_ratio[rows]).sum(-1)
        out.kl[bs, ts] = kl.view(shape)
    return out


def _check(x, tokens, temperature):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if tokens.shape != x.shape[:-1]:
        raise ValueError(f"tokens {list(tokens.shape)} must match the leading dims of {list(x.shape)}")


def _dispatch(x, weight, tokens, temperature, chunk_size, with_entropy):
    _check(x, tokens, temperature)
    vocab = x.shape[-1] if weight is None else weight.shape[0]
    chunk_size = chunk_size or max(1, CHUNK_BYTES // (4 * vocab))
    # Whether a gradient can be asked for: needs_input_grad follows requires_grad even under no_grad, where
    # keeping blocks or forming the frozen head's gradient would be work for nothing.
    grad_enabled = torch.is_grad_enabled()
    return _ChunkedLogprobs.apply(x, weight, tokens, float(temperature), int(chunk_size), with_entropy, grad_enabled)


# ---- chunked path -------------------------------------------------------------------------------------

def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> float32; float64 stays float64


def _blocks(B: int, T: int, chunk: int):
    """(batch slice, time slice) pairs covering [B, T] in order with at most `chunk` rows each.

    Blocks are whole sequences when T <= chunk, else pieces of one sequence; either way x[bs, ts] is a view
    (x may be non-contiguous, e.g. logits[:, :-1]) and only its reshape to rows may copy, one block at a time.
    """
    if T <= chunk:
        step = chunk // max(T, 1)
        for b in range(0, B, step):
            yield slice(b, b + step), slice(None)
    else:
        for b in range(B):
            for t in range(0, T, chunk):
                yield slice(b, b + 1), slice(t, t + chunk)


def _matmul_dtype(x, weight):
    """The head matmul's dtype: autocast's if it is on (as lm_head(hidden) would use), else the input's.
    Recorded in forward and reused in backward, which autocast does not reach, so the recomputed
    logits are bit-identical to the forward's."""
    if weight is None:
        return None
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _block_logits(x, weight, temperature, mm_dtype=None):
    """float logits / T for one block: x [n, V] logits, or x [n, D] hidden with weight [V, D]."""
    dtype = _compute_dtype(x)
    if weight is None:
        z = x.to(dtype, copy=True)
    else:
        md = mm_dtype or x.dtype
        z = linear(x.to(md), weight.to(md)).to(dtype)  # [n, V], a fresh buffer; float32 through oneDNN
    return z.div_(temperature)  # in place: one [n, V] buffer, which callers may modify in place too


def _block_log_softmax(x_block, weight, temperature, mm_dtype):
    """(logsumexp [n, 1], log-softmax [n, V]) of one block's logits / T; x_block [.., V] or [.., D]."""
    z = _block_logits(x_block.reshape(-1, x_block.shape[-1]), weight, temperature, mm_dtype)  # [n, V]
    row_lse = _row_logsumexp(z)  # [n, 1]
    return row_lse, z.sub_(row_lse)  # in place: z is not needed again


def _row_slices(z):
    """Slices of z's rows [n, V] whose float temporaries fit in SLICE_BYTES (at least one row each)."""
    step = max(1, SLICE_BYTES // (z.element_size() * max(z.shape[-1], 1)))
    return [slice(i, i + step) for i in range(0, z.shape[0], step)]


def _row_logsumexp(z):
    """torch.logsumexp(z, -1, keepdim=True) of z [n, V], bit for bit, computed a slice of rows at a time
    so that no [n, V] temporary is allocated (SLICE_BYTES): the same ops per row as torch's, max, then
    log Σ exp(z − max) + max, with an infinite max taken as 0."""
    out = torch.empty(z.shape[0], 1, dtype=z.dtype, device=z.device)
    for rows in _row_slices(z):
        zs = z[rows]
        m = zs.amax(-1, keepdim=True)
        m = m.masked_fill(m.isinf(), 0.0)
        out[rows] = (zs - m).exp_().sum(-1, keepdim=True).log_().add_(m)
    return out


def _row_entropy(logp):
    """−Σ p log p per row of a log-softmax block [n, V] -> [n], a slice of rows at a time."""
    out = torch.empty(logp.shape[0], dtype=logp.dtype, device=logp.device)
    for rows in _row_slices(logp):
        out[rows] = -(logp[rows].exp() * logp[rows]).sum(-1)
    return out


class _ChunkedLogprobs(torch.autograd.Function):
    """Inputs: x [B, T, V] logits (weight None) or [B, T, D] hidden with weight [V, D]; tokens [B, T].
    Saves x, weight, tokens and per-row logsumexp / entropy ([B, T]), plus the blocks kept (SAVE_BYTES) or,
    for a frozen head, d logprob / d hidden [B, T, D] formed in forward; otherwise backward recomputes."""

    @staticmethod
    def forward(ctx, x, weight, tokens, temperature, chunk, with_entropy, grad_enabled):
        B, T = tokens.shape
        dtype = _compute_dtype(x)
        logprobs = torch.empty(B, T, dtype=dtype, device=x.device)
        lse = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        mm_dtype = _matmul_dtype(x, weight)
        vocab = x.shape[-1] if weight is None else weight.shape[0]
        # A frozen head (LoRA, DPO's policy) and no entropy: the only gradient is g · d logprob / d hidden with
        # g one number a row, so the [n, D] factor is formed here from each block, whose [n, V] buffers die with
        # it: the same multiply-adds as backward's, D/V of the memory kept (SFT at 4 x 512: 4.7 MB, not 403).
        want_x, want_w = (grad_enabled and wants for wants in ctx.needs_input_grad[:2])
        precompute = weight is not None and want_x and not want_w and not with_entropy
        grad_unit = torch.empty_like(x) if precompute else None  # [B, T, D]
        # The head in the matmul dtype once per call: a float32 master under bf16 autocast (full fine-tuning)
        # was cast per block, 8 casts of 28M weights a forward at SmolLM2's 4 x 512 (a no-op otherwise).
        head = None if weight is None else weight.to(mm_dtype)
        keep = not precompute and (want_x or want_w) and B * T * vocab * 4 <= SAVE_BYTES
        ctx.kept = [] if keep else None
        for bs, ts in _blocks(B, T, chunk):
            row_lse, logp = _block_log_softmax(x[bs, ts], head, temperature, mm_dtype)  # [n, 1], [n, V]
            if keep:
                ctx.kept.append(logp)
            shape = logprobs[bs, ts].shape
            tok = tokens[bs, ts].reshape(-1, 1)  # [n, 1]
            lse[bs, ts] = row_lse.view(shape)
            logprobs[bs, ts] = logp.gather(1, tok).view(shape)
            if with_entropy:
                entropy[bs, ts] = _row_entropy(logp).view(shape)
            if precompute:  # in place on the block: its log-probs are read above
                grad_unit[bs, ts] = _logprob_grad_factor(logp, tok, temperature, head, x.dtype).view(
                    grad_unit[bs, ts].shape)
        ctx.save_for_backward(None if precompute else x, weight, tokens, lse, entropy, grad_unit)
        ctx.temperature, ctx.chunk, ctx.mm_dtype = temperature, chunk, mm_dtype
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # gradients built from saved values: no double backward
    def backward(ctx, grad_logprobs, grad_entropy):
        x, weight, tokens, lse, entropy, grad_unit = ctx.saved_tensors
        if grad_unit is not None:  # no entropy output, so grad_entropy is None
            grad_x = None if grad_logprobs is None else (grad_unit * grad_logprobs.unsqueeze(-1)).to(grad_unit.dtype)
            return grad_x, None, None, None, None, None, None
        B, T = tokens.shape
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if want_x else None  # every block writes its rows
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None  # accumulated over blocks
        kept, ctx.kept = ctx.kept, None  # used once: a second backward (retain_graph) recomputes
        md = ctx.mm_dtype
        # once, as in forward; only where a block is recomputed or grad_x wanted (a cast a float32 master pays)
        head = weight.to(md) if weight is not None and (want_x or not kept) else None
        for i, (bs, ts) in enumerate(_blocks(B, T, ctx.chunk)):
            x_block = x[bs, ts].reshape(-1, x.shape[-1])  # [n, V] or [n, D]
            logp = kept[i] if kept else _block_logits(x_block, head, ctx.temperature, md).sub_(
                lse[bs, ts].reshape(-1, 1))  # [n, V]
            grad_z = _grad_logits(logp, tokens[bs, ts].reshape(-1, 1),
                                  None if grad_logprobs is None else grad_logprobs[bs, ts].reshape(-1, 1),
                                  None if grad_entropy is None else grad_entropy[bs, ts].reshape(-1, 1),
                                  None if entropy is None else entropy[bs, ts].reshape(-1, 1))
            grad_z = grad_z.div_(ctx.temperature).to(x.dtype)  # d/d(logits) = d/dz / T
            if weight is None:
                grad_x[bs, ts] = grad_z.view(grad_x[bs, ts].shape)
                continue
            if want_x:
                grad_x[bs, ts] = input_grad(grad_z.to(md), head).view(grad_x[bs, ts].shape)  # [n, D]
            if want_w:  # in x's dtype: a bf16 product here costs two more [n, V] / [V, D] casts a block
                grad_w += (grad_z.t() @ x_block).float()  # [V, D]
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def _logprob_grad_factor(logp, tok, temperature, head, dtype):
    """d logprob / d hidden for one block: (onehot - p) / T @ W -> [n, D], p formed in place on logp [n, V];
    the softmax math in float32, the matmul in the head's dtype, as backward would do it. (_grad_logits with a
    unit upstream gradient gives the same block but multiplies it by 1: +8% on this kernel, measured.)"""
    grad_z = logp.exp_().neg_().scatter_add_(1, tok, torch.ones_like(tok, dtype=logp.dtype))
    return input_grad(grad_z.div_(temperature).to(dtype).to(head.dtype), head)


def _grad_logits(logp, tok, g_lp, g_h, entropy):
    """d loss / d z for one block, given upstream grads of logprob (g_lp [n, 1]) and entropy (g_h [n, 1]).

    logprob = logp[tok]:            d/dz_k = onehot_k - p_k
    H = -sum_j p_j logp_j:          d/dz_k = -p_k (logp_k + H)
    Both are formed in place on logp (the block's own buffer, not needed after this), so the block needs
    one more [n, V] buffer for p when there is an entropy gradient and none otherwise.
    """
    p = logp.exp() if g_h is not None else logp.exp_()  # [n, V]; without g_h, logp is not read again
    coeff = torch.zeros_like(p[:, :1]) if g_lp is None else g_lp.to(p.dtype)  # [n, 1]
    if g_h is not None:  # coeff_k = g_lp + g_h (logp_k + H)
        coeff = logp.add_(entropy).mul_(g_h.to(p.dtype)).add_(coeff)
    grad = p.mul_(coeff).neg_()
    if g_lp is not None:
        grad.scatter_add_(1, tok, g_lp.to(p.dtype))
    return grad
