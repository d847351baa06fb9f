"""Linear with a frozen int8 weight: y = x @ (q * scale[:, None]).T + bias, differentiable in x only.

Storage (LLM.int8 vector-wise quantisation): q int8 [out, in] and scale float32 [out] = row absmax / 127,
so the dequantised weight is q * scale and |w - q * scale| <= scale / 2 elementwise (round to nearest).
Three implementations of the same op, chosen per device by `default_impl`:
  reference     dequantise, then F.linear in the activation dtype. Plain torch, any device.
  int_mm        CPU LLM.int8: activations quantised per row (absmax) to int8, torch._int_mm with int32
                accumulation, rescaled by (row scale x weight scale). Input entries with
                |x| >= threshold (outlier features) skip quantisation and are multiplied in float
                against the dequantised weight columns. The input gradient is formed the same way from
                grad_out * scale (no outlier split: gradients have no fixed magnitude to threshold).
  bitsandbytes  bitsandbytes' int8_vectorwise_quant + int8_mixed_scaled_mm, the kernels behind
                Linear8bitLt that StackLLaMA trained with; input gradient by dequantise-then-matmul,
                as bitsandbytes does it.
Whichever runs, only q and scale are saved for backward: no float copy of the weight outlives a call.
Threshold 6.0 is bitsandbytes' and StackLLaMA's default. Outlier columns are chosen per call from the
whole batch (as in bitsandbytes), but each row moves only its own |x| >= threshold entries to the float
part, so a row's output does not depend on the rows beside it (bitsandbytes moves whole columns).

Measured with bench/int8.py on 2 threads of an AMD EPYC (AVX-512 VNNI), torch 2.13, bitsandbytes 0.50.2:
fastest of repeated calls over 2 sweeps (the cores are shared; a one-thread CPU-time sweep, immune to
other jobs, ranks the same; both tables in docs/BENCHMARKS_int8_notes.md). A 4096x4096 layer, forward
ms (forward + input-gradient ms):
  tokens dtype  float weight  reference   int_mm      bnb          _weight_int8pack_mm
  1      fp32   2.6 (5.5)     6.2 (29)    0.52 (1.4)  0.50 (7.8)   5.4 (no backward)
  16     fp32   5.9 (13)      10 (36)     1.7 (3.1)   2.0 (15)     15-35x float from here on
  2048   fp32   338 (681)     344 (707)   49 (110)    106 (495)    -
  1      bf16   1.0 (3.2)     22 (45)     0.37 (1.4)  0.43 (24)    0.48
  256    bf16   9.3 (20)      38 (79)     6.9 (13)    9.4 (49)     24
  2048   bf16   75 (157)      95 (185)    66 (140)    121 (213)    -
Relative error against the float weight (Gaussian weights; 4 input columns at 8 sigma, as LLM.int8's
outlier features): reference 0.9e-2 (weight rounding alone), int_mm and bnb 1.2-1.6e-2 (activation rounding
too), int_mm without the outlier split 2.4-4.2e-2. Decision: CPU -> int_mm: of the 8-bit options the
fastest (or tied with bnb's forward, the same algorithm) at every 4096-wide size in both dtypes, backward
included, and faster than the float weight itself except in bf16 around 16 tokens (1.7 vs 1.4 ms) and at
512 wide in bf16 (by <= 0.06 ms under 256 tokens, 20% at 2048). CUDA -> bitsandbytes when installed
(cuBLASLt int8, the recipe's numerics; not measured: no GPU was lent to this work), else reference.
Other devices -> reference.

References: Dettmers et al. 2022, LLM.int8() (arXiv:2208.07339) section 3; bitsandbytes 0.50
autograd/_functions.py (MatMul8bitLt) and backends/default/ops.py; gpt-fast quantize.py
(WeightOnlyInt8Linear); pytorch#136942 (CPU _int_mm overflow fix, torch >= 2.6).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

IMPLS = ("reference", "int_mm", "bitsandbytes")


# ---- storage format ---------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale float32 [out]) with weight ~= q * scale[:, None]; an all-zero row gets scale 1."""
    # A float32 copy of QUANTIZE_ROWS rows at a time, worked on in place: quantising at load costs little
    # beyond the int8 result (four whole float32 temporaries per layer held a SmolLM2 8-bit load 12 MiB above
    # its model). Rows are independent, so the chunking changes no value.
    weight = weight.detach()
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        w = weight[rows].to(torch.float32, copy=True)
        low, high = torch.aminmax(w, dim=1)
        absmax = torch.maximum(high, -low)
        scale[rows] = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        q[rows] = w.div_(scale[rows, None]).round_().clamp_(-127, 127)
    return q, scale


QUANTIZE_ROWS = 256


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] that (qweight [out, in], scale [out]) stands for, in `dtype`."""
    # float32 then one rounding to dtype; (measured: 2x faster than int8 * float32 promotion on CPU)
    return qweight.to(torch.float32).mul_(scale.float()[:, None]).to(dtype)


# ---- capability and dispatch ------------------------------------------------------------------------

def available(impl: str, device: torch.device | str = "cpu") -> bool:
    """Whether `impl` runs (and is not a slow fallback) on `device`. Imports nothing."""
    device = torch.device(device)
    if impl == "reference":
        return True
    if impl == "int_mm":
        # Without AVX-512, CPU _int_mm is a scalar loop slower than float matmul (bitsandbytes' note in
        # backends/cpu/ops.py); before torch 2.6 it could overflow its accumulator (pytorch#136942).
        return (device.type == "cpu" and hasattr(torch, "_int_mm")
                and torch.backends.cpu.get_cpu_capability() == "AVX512")
    if impl == "bitsandbytes":
        return device.type in ("cpu", "cuda") and importlib.util.find_spec("bitsandbytes") is not None
    raise ValueError(f"unknown int8 matmul implementation {impl!r}; choose one of {IMPLS}")


def default_impl(device: torch.device | str) -> str:
    """The measured choice per device (see the header)."""
    device = torch.device(device)
    if device.type == "cuda" and available("bitsandbytes", device):
        return "bitsandbytes"
    if device.type == "cpu" and available("int_mm", device):
        return "int_mm"
    return "reference"


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: float = 6.0, impl: str | None = None) -> torch.Tensor:
    """x [..., in] (float32/bfloat16/float16) -> [..., out] in x's dtype; gradient flows to x only."""
    impl = impl or default_impl(x.device)
    out = _Int8Linear.apply(x, qweight, scale, float(threshold), impl)
    return out if bias is None else out + bias.to(out.dtype)


# ---- implementations: each takes x [N, in] and returns float [N, out] (bias is added by the caller) ----

def reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, threshold: float = 0.0):
    """Dequantise, then matmul in x's dtype. The threshold is ignored: nothing here is quantised."""
    return F.linear(x, dequantize_int8(qweight, scale, x.dtype))


def fast_int_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, threshold: float = 6.0):
    """LLM.int8 with torch._int_mm; each row's outlier inputs (|x| >= threshold) multiplied in float."""
    return _int8_matmul(x, qweight.t(), threshold).mul_(scale)  # [N, in] @ [in, out] -> [N, out]


def fast_bitsandbytes(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, threshold: float = 6.0):
    """bitsandbytes' LLM.int8 kernels (CUDA cuBLASLt; on CPU its torch fallbacks)."""
    import bitsandbytes.functional  # lazy: the import probes a kernel hub and warns, so only when chosen

    # bnb quantises fp16 and zeroes outliers in place before restoring them: hand it a private copy.
    x16 = x.to(torch.float16, copy=True)
    cx, x_scale, outlier_cols = bitsandbytes.functional.int8_vectorwise_quant(x16, threshold)
    # bnb's SCB is the row absmax itself (it dequantises with SCB / 127).
    out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, cx, qweight, x_scale, scale.float() * 127,
                                                        outlier_cols, None)
    return out


_FORWARD = {"reference": reference, "int_mm": fast_int_mm, "bitsandbytes": fast_bitsandbytes}


def _absmax(a: torch.Tensor, dim: int) -> torch.Tensor:
    """max |a| along dim. amax and amin are single read passes; measured 5-10x faster on CPU than
    vector_norm(inf) or abs().amax(), which allocates |a|."""
    return torch.maximum(a.amax(dim), a.amin(dim).neg_())


def _int8_matmul(a: torch.Tensor, b: torch.Tensor, threshold: float, a_col_scale: torch.Tensor | None = None):
    """(a * a_col_scale) @ b for a float [N, K], b int8 [K, M] -> float32 [N, M]: a quantised per row to int8,
    each row's outlier entries (|a| >= threshold) kept in float. One float32 working copy of a is made and then
    modified in place: on CPU each fresh [N, K] buffer costs page faults comparable to a full pass."""
    if a.shape[0] == 0:  # no rows (e.g. every sequence finished): the absmax reductions have no identity
        return a.new_zeros(0, b.shape[1], dtype=torch.float32)
    a = a.to(torch.float32, copy=True)  # [N, K]; the caller's tensor is untouched
    if a_col_scale is not None:
        a.mul_(a_col_scale)
    outlier_cols = None
    if threshold > 0:
        outlier_cols = (_absmax(a, 0) >= threshold).nonzero().squeeze(1)  # [n_outliers], any row's
        if outlier_cols.numel() == 0:
            outlier_cols = None
        else:
            # Each row splits off only its own outliers: a column flagged by another row stays in the int8 part
            # for this one. bitsandbytes moves whole columns, so a row's output depended on the rows beside it
            # (SmolLM2, 8 rows scored together or as 2 x 4: log-probs apart by up to 1.45 nats, 0.21 on
            # average), and PPO's minibatches then scored rows differently from the rollout.
            a_cols = a[:, outlier_cols]  # [N, n_outliers]
            own = a_cols.abs() >= threshold
            a_outliers = a_cols * own  # kept in float
            a.index_copy_(1, outlier_cols, a_cols.masked_fill_(own, 0.0))
    a_scale = _absmax(a, 1).unsqueeze(1).clamp_(min=1e-30) / 127  # [N, 1]
    aq = a.div_(a_scale).round_().to(torch.int8)  # [N, K]
    out = torch._int_mm(aq, b).float().mul_(a_scale)  # int32 [N, M] -> float32
    if outlier_cols is not None:
        out.addmm_(a_outliers, b[outlier_cols].float())  # [N, n_outliers] @ [n_outliers, M]
    return out


class _Int8Linear(torch.autograd.Function):
    """x [..., in] -> [..., out]; saves only qweight [out, in] int8 and scale [out] for backward."""

    @staticmethod
    def forward(ctx, x, qweight, scale, threshold, impl):
        ctx.save_for_backward(qweight, scale)
        ctx.impl = impl
        out = _FORWARD[impl](x.reshape(-1, x.shape[-1]), qweight, scale, threshold)  # [N, out]
        return out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scale = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        if ctx.impl == "int_mm":  # g @ (q * s[:, None]) == (g * s) @ q: the scale folds into g's columns
            grad_x = _int8_matmul(g, qweight, threshold=0.0, a_col_scale=scale)  # [N, in]
        else:
            grad_x = g @ dequantize_int8(qweight, scale, g.dtype)  # transient float weight, freed on return
        return grad_x.to(grad_out.dtype).view(*grad_out.shape[:-1], qweight.shape[1]), None, None, None, None
