"""Dense linear y = x Wᵀ + b in float32 on CPU through oneDNN instead of MKL.

torch's F.linear on float32 CPU tensors calls MKL's sgemm (bf16 already goes to oneDNN). On AMD CPUs MKL
does not run its AVX-512 code, and on the AMD EPYC (AVX-512) these figures come from, oneDNN's float32
GEMM, the kernel torch's own inductor backend emits for CPU linears, ran all 210 products of SmolLM2's 30
layers at 2048 rows 1.11x (forward) and 1.16x (input gradient) faster than F.linear, shape by shape with the
weight in cache 1.15-1.35x, and its weight gradient no faster (bench/linear.py; docs/BENCHMARKS.md "Float32
linears through oneDNN").
  reference  F.linear, any device and dtype.
  onednn     torch.ops.mkldnn._linear_pointwise for y and for the input's gradient (g W, as a linear whose
             weight is the strided view Wᵀ: no copy); the weight's gradient stays gᵀ x (oneDNN measured no
             faster there). Float32 CPU tensors with autocast off, outside torch.compile; everything else
             runs the reference.
A frozen weight saves only the weight for backward and a frozen input only the input, as F.linear does.
A oneDNN call costs ~12 µs more than MKL's (15 against 3 µs for a 128 x 128 weight and one row), and the
autograd Function ~100 µs more a forward + backward than F.linear's C++ one, so small products stay on
F.linear: below MIN_MACS multiply-adds (rows x in x out) the gain does not pay for it (forward + backward
break-even measured at 20-50M at the demo's and SmolLM2's widths; with 8M as the bar the demo's PPO stage took
114 s against 84).

Decode steps multiply 16 or so rows by every weight of the model once a token, where the weight's layout,
not the arithmetic, sets the speed: `pack` reorders a weight into oneDNN's blocked layout for a given row
count once, and `linear(..., packed=...)` multiplies by it without gradient. At 16 rows over SmolLM2's 30
layers of linears, weights streaming from memory: float32 1.5x, bf16 1.44x faster than F.linear. A packed
float32 weight under PACK_MIN_WEIGHTS elements is not worth it (the call overhead again: 128 x 352 at 16 rows
0.8x F.linear's speed, 192 x 576 level, 576 x 576 1.4x); bf16 already runs through oneDNN, so packing only helps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_MACS = 2**26  # rows x in x out from which float32 takes oneDNN (67M: SmolLM2's 576 x 576 from 202 rows)
PACK_MIN_WEIGHTS = 2**16  # float32 weights with fewer elements are not packed (the demo's 128 x 352: 45K)


def available() -> bool:
    """oneDNN (torch built with MKLDNN, as the x86 wheels are) and the op inductor uses for CPU linears."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the oneDNN path: float32 CPU tensors, autocast off (autocast would
    run the matmul in its own dtype), at least a matrix of rows, and at least MIN_MACS multiply-adds."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and weight.dim() == 2 and x.shape[-1] > 0) or torch.compiler.is_compiling():
        return False  # under torch.compile inductor lowers F.linear itself (it cannot lower this op unfrozen)
    macs = x.numel() // x.shape[-1] * weight.numel()  # rows x in x out (x's last dimension is in, or out for g W)
    return macs >= MIN_MACS and not torch.is_autocast_enabled("cpu") and available()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        want_x, want_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if want_w else None, weight if want_x else None)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad
        grad = grad.contiguous()  # a broadcast gradient (e.g. from .sum()) has zero strides
        grad_x = _onednn(grad, weight.t(), None) if want_x else None  # g W as a linear by Wᵀ
        grad2 = grad.reshape(-1, grad.shape[-1])  # [n, out]
        grad_w = grad2.t() @ x.reshape(-1, x.shape[-1]) if want_w else None  # [out, in]
        grad_b = grad2.sum(0) if want_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN where `uses_onednn`. `packed` (from `pack(weight, rows)`) is
    used when no gradient is wanted, in either float dtype; with a gradient wanted it is ignored."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if packed is not None and not wants_grad and x.device.type == "cpu" and not torch.compiler.is_compiling():
        # the dtype F.linear would multiply in: autocast's where it is on (it casts x, weight and bias)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if packed.dtype == dtype:
            return _onednn(x.to(dtype), packed, None if bias is None else bias.to(dtype))
    if not uses_onednn(x, weight) or (bias is not None and bias.dtype != torch.float32):
        return F.linear(x, weight, bias)
    if wants_grad:
        return _Linear.apply(x, weight, bias)
    return _onednn(x, weight, bias)


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad [n, out] @ weight [out, in] -> [n, in], the input's gradient of a linear, without autograd."""
    if uses_onednn(grad, weight):
        return _onednn(grad.contiguous(), weight.t(), None)
    return grad @ weight


def pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """weight [out, in] in oneDNN's layout for multiplying about `rows` rows at a time (an opaque tensor, the
    weight's size again), or None where there is no oneDNN or the dtype has no fast packed path (bf16 without
    the CPU's bf16 instructions, which torch emulates)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or not available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    if weight.dtype == torch.float32 and weight.numel() < PACK_MIN_WEIGHTS:
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
