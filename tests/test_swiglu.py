"""kernels/swiglu.py: silu(gate) * up with two tensors kept for backward; values and gradients bit-identical to
autograd's reference, in fp32 and bf16, with either input alone requiring a gradient."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kernels import swiglu as kernel


def kept_tensors(fn, *inputs):
    """The tensors autograd keeps for backward when fn(*inputs) runs."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn(*inputs)
    return out, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_values_and_gradients_equal_autograds(dtype, wants):
    g = torch.Generator().manual_seed(0)
    gate0, up0 = (torch.randn(6, 5, 24, generator=g).to(dtype) * 3 for _ in range(2))
    grad = torch.randn(6, 5, 24, generator=g).to(dtype)
    results = []
    for fn in (kernel.reference, kernel.swiglu):
        gate, up = gate0.clone().requires_grad_(wants[0]), up0.clone().requires_grad_(wants[1])
        out = fn(gate, up)
        out.backward(grad)
        results.append((out, gate.grad, up.grad))
    for ref, ours in zip(*results):
        assert (ref is None) == (ours is None)
        if ref is not None:
            assert ours.dtype == dtype and torch.equal(ref, ours)
    assert torch.equal(results[0][0], F.silu(gate0) * up0)


def test_two_tensors_kept_instead_of_three():
    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    _, ref_kept = kept_tensors(kernel.reference, gate, up)
    out, kept = kept_tensors(kernel.swiglu, gate, up)
    assert len(ref_kept) == 3  # gate (silu's backward), silu(gate) and up (the product's)
    assert len(kept) == 2 and kept[0] is gate and kept[1] is up
    with torch.no_grad():
        assert kernel.swiglu(gate, up).grad_fn is None  # no grad wanted: the plain reference
    assert out.grad_fn is not None
