"""kernels/lora.py: LoRA's update with dropout keeps x (shared between adapters) and a bool mask, not two float
copies; with the same mask its values and gradients equal the reference's within round-off, and the mask drops
a fraction p of the inputs."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.kernels import lora as kernel


def kept_tensors(fn):
    """The tensors autograd keeps for backward while fn() runs, and fn's result."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, kept


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 24, generator=g).to(dtype)
    lora_a, lora_b = torch.randn(4, 24, generator=g).to(dtype), torch.randn(10, 4, generator=g).to(dtype)
    keep_mask = torch.rand(3, 7, 24, generator=g) >= 0.3
    grad = torch.randn(3, 7, 10, generator=g).to(dtype)
    return x, lora_a, lora_b, keep_mask, grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("wants", [(True, True, True), (True, False, False), (False, True, True)])
def test_with_the_same_mask_values_and_gradients_equal_the_reference(dtype, tol, wants):
    x0, a0, b0, keep_mask, grad = inputs(dtype)
    results = []
    for fast in (False, True):
        x, a, b = (t.clone().requires_grad_(w) for t, w in zip((x0, a0, b0), wants))
        if fast:
            out = kernel._LoRAUpdate.apply(x, a, b, keep_mask, 2.0, 0.7)
        else:  # the reference's dropout with this mask: x * mask / keep
            out = kernel.reference(x * keep_mask / 0.7, a, b, 2.0, 0.0, False)
        out.backward(grad)
        results.append((out, x.grad, a.grad, b.grad))
    for ref, ours in zip(*results):
        assert (ref is None) == (ours is None)
        if ref is not None:
            assert ours.dtype == dtype
            torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # by hand for one output: out[0, 0, j] = 2 * sum_k b[j, k] * sum_i a[k, i] * x[0, 0, i] * m[0, 0, i] / 0.7
    by_hand = 2 * b0.double() @ (a0.double() @ (x0[0, 0].double() * keep_mask[0, 0] / 0.7))
    torch.testing.assert_close(results[1][0][0, 0].double(), by_hand, rtol=tol, atol=tol * by_hand.abs().max())


def test_keeps_x_and_a_bool_mask_not_two_float_copies():
    x, lora_a, lora_b, _, _ = inputs()
    x.requires_grad_(True)
    lora_a.requires_grad_(True)
    lora_b.requires_grad_(True)
    _, ref_kept = kept_tensors(lambda: kernel.reference(x, lora_a, lora_b, 2.0, 0.3, True))
    assert sum(t.shape == x.shape and t.dtype == x.dtype for t in ref_kept) == 1  # dropout's float noise
    assert sum(t.numel() == x.numel() and t.is_floating_point() for t in ref_kept) == 2  # and the dropped copy
    # two adapters on one input, as q_proj's and v_proj's: x kept once, by identity, plus a byte mask each
    _, kept = kept_tensors(lambda: [kernel.lora_update(x, lora_a, lora_b, 2.0, 0.3, True) for _ in range(2)])
    big = [t for t in kept if t.numel() == x.numel()]
    assert sum(t is x for t in big) == 2 and all(t is x or t.dtype == torch.bool for t in big)
    assert len({t.untyped_storage().data_ptr() for t in big if t.is_floating_point()}) == 1


def test_the_mask_drops_a_fraction_p_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(64, 256) + 1.0  # no zeros of its own
    eye = torch.eye(256)
    x.requires_grad_(True)
    dropped = kernel.lora_update(x, eye, eye, 1.0, 0.25, True)  # A = B = I: the update is dropout(x)
    zero = dropped == 0
    assert 0.23 < zero.float().mean().item() < 0.27  # 16384 draws: p = 0.25 ± 0.01 (3 sigma 0.01)
    torch.testing.assert_close(dropped[~zero], (x / 0.75)[~zero])
    dropped.sum().backward()
    assert torch.equal(x.grad == 0, zero)  # the gradient flows through the kept inputs only
    torch.testing.assert_close(x.grad[~zero], torch.full_like(x, 1 / 0.75)[~zero])


@pytest.mark.parametrize("case", ["eval", "p0", "no_grad"])
def test_without_dropout_or_gradients_it_is_the_reference(case):
    x, lora_a, lora_b, _, _ = inputs()
    lora_a.requires_grad_(True)
    training, p = case != "eval", (0.0 if case == "p0" else 0.3)
    with torch.set_grad_enabled(case != "no_grad"):
        out = kernel.lora_update(x, lora_a, lora_b, 2.0, p, training)
        if case == "no_grad":
            assert out.grad_fn is None
            return  # dropout on, no gradient: a random draw, only its path is checked
        assert "LoRAUpdate" not in type(out.grad_fn).__name__
    assert torch.equal(out, F.linear(F.linear(x, lora_a), lora_b) * 2.0)


def test_bad_dropout_and_double_backward_raise():
    x, lora_a, lora_b, _, _ = inputs()
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\), got 1.0"):
        kernel.lora_update(x, lora_a, lora_b, 2.0, 1.0, True)
    x.requires_grad_(True)
    out = kernel.lora_update(x, lora_a, lora_b, 2.0, 0.3, True)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)  # the upstream 2·out has a graph
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.sum().backward()  # built from saved values: a second derivative would be silently wrong


@pytest.mark.slow
def test_the_function_under_torch_compile_drops_and_scales_as_eager():
    """Under torch.compile the Function traces (no graph break) and its forward and backward keep their meaning:
    with A = B = I the update is dropout(x), zero where dropped and x / keep elsewhere, and the gradient follows
    the same mask."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    x = (torch.rand(32, 64) + 1.0).requires_grad_(True)
    eye_a, eye_b = torch.eye(64), torch.eye(64)  # two tensors: dynamo refuses one passed twice to a Function
    dropped = torch.compile(lambda x: kernel.lora_update(x, eye_a, eye_b, 1.0, 0.25, True))(x)
    assert not torch._dynamo.utils.counters["graph_break"]
    zero = dropped == 0
    assert 0.2 < zero.float().mean().item() < 0.3
    torch.testing.assert_close(dropped[~zero], (x / 0.75)[~zero])
    dropped.sum().backward()
    assert torch.equal(x.grad == 0, zero)
    torch.testing.assert_close(x.grad[~zero], torch.full_like(x, 1 / 0.75)[~zero])
