"""kernels/logprobs.py: the chunked log-probs / entropy against the plain log_softmax reference, in values and
gradients (through logits, or through hidden states and the LM-head weight), fp32 to 1e-5, bf16 to bf16
precision, with chunks that do not divide the rows, non-contiguous inputs and temperatures. Peak memory is
measured by bench/logprobs.py, not here.
"""
import pytest
import torch

from rlhf_engine.kernels import logprobs as lp_kernel

B, T, V, D = 3, 7, 50, 16


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def loss_of(logprobs, entropy, seed=0):
    """A loss that weights every position's log-prob and entropy differently, like PPO's masked sums."""
    g = torch.Generator().manual_seed(seed)
    return (logprobs * torch.randn(logprobs.shape, generator=g)).sum() + (
        entropy * torch.randn(entropy.shape, generator=g)).sum()


def assert_matches(got, want, inputs, tol, grad_tol=None):
    """(logprobs, entropy) pairs agree, and so do the gradients of loss_of(...) with respect to `inputs`."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, tol)
    grads = torch.autograd.grad(loss_of(*got), inputs)
    grads_ref = torch.autograd.grad(loss_of(*want), inputs)
    for g, w, x in zip(grads, grads_ref, inputs):
        assert g.dtype == x.dtype
        assert_close(g, w, grad_tol or tol)
    return grads


def test_hand_computed_values():
    # logits [0, ln 3] at T=1: p = (1/4, 3/4); log p(token 1) = ln 0.75; H = -(.25 ln .25 + .75 ln .75)
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0)).item()]]])
    logprobs, entropy = lp_kernel.token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert logprobs.item() == pytest.approx(torch.log(torch.tensor(0.75)).item(), abs=1e-6)
    assert entropy.item() == pytest.approx(-(0.25 * torch.log(torch.tensor(0.25)) + 0.75 * torch.log(
        torch.tensor(0.75))).item(), abs=1e-6)
    # temperature 2 halves the logits: p = softmax([0, ln 3 / 2]) = (1, sqrt 3) / (1 + sqrt 3)
    logprobs = lp_kernel.token_logprobs(logits, torch.tensor([[0]]), temperature=2.0)
    assert logprobs.item() == pytest.approx(-torch.log1p(torch.tensor(3.0).sqrt()).item(), abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 8, 64])  # rows per chunk: dividing T, not, > T, > B*T
def test_logits_path_matches_reference_fp32(chunk_size, temperature):
    torch.manual_seed(0)
    logits = (3 * torch.randn(B, T + 1, V)).requires_grad_()
    tokens = torch.randint(0, V, (B, T))
    shifted = logits[:, :-1]  # non-contiguous, as in `logits[:, :-1]` against `tokens[:, 1:]`
    got = lp_kernel.token_logprobs_and_entropy(shifted, tokens, temperature, chunk_size)
    want = lp_kernel.reference(shifted, tokens, temperature)
    assert got[0].dtype == torch.float32 and got[0].shape == got[1].shape == (B, T)
    (grad,) = assert_matches(got, want, (logits,), 1e-5)
    assert (grad[:, -1] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_hidden_path_matches_reference_fp32(chunk_size, temperature):
    torch.manual_seed(1)
    hidden = torch.randn(B, T, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    got = lp_kernel.hidden_token_logprobs(hidden, weight, tokens, temperature, with_entropy=True,
                                          chunk_size=chunk_size)
    want = lp_kernel.hidden_reference(hidden, weight, tokens, temperature)
    assert_matches(got, want, (hidden, weight), 1e-5)


def test_bf16_inputs_are_computed_in_float32():
    torch.manual_seed(2)
    logits = (3 * torch.randn(B, T, V)).to(torch.bfloat16).requires_grad_()
    hidden = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    # from logits the bf16 values are upcast exactly, so the float32 math matches to float32 precision
    got = lp_kernel.token_logprobs_and_entropy(logits, tokens, chunk_size=4)
    want = lp_kernel.reference(logits, tokens)
    assert got[0].dtype == torch.float32
    assert_matches(got, want, (logits,), 1e-5, grad_tol=1e-2)  # the gradients are both rounded to bf16
    # through the bf16 LM-head matmul: logits differ by bf16 rounding (|z| ~ 4: steps of 2**-6)
    got = lp_kernel.hidden_token_logprobs(hidden, weight, tokens, with_entropy=True, chunk_size=4)
    want = lp_kernel.hidden_reference(hidden, weight, tokens)
    assert_matches(got, want, (hidden, weight), 3e-2)


def test_logprobs_only_and_no_grad():
    torch.manual_seed(3)
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    logprobs = lp_kernel.token_logprobs(logits, tokens, chunk_size=2)
    (grad,) = torch.autograd.grad(logprobs.sum(), logits)
    # d log p_tok / d z = onehot - p: each row's gradient sums to zero
    assert_close(grad.sum(-1), torch.zeros(B, T), 1e-6)
    with torch.no_grad():
        assert_close(lp_kernel.token_logprobs(logits, tokens), lp_kernel.reference(logits, tokens)[0], 1e-5)
    hidden, weight = torch.randn(B, T, D), torch.randn(V, D)
    only = lp_kernel.hidden_token_logprobs(hidden, weight, tokens)
    assert isinstance(only, torch.Tensor) and only.shape == (B, T)


def test_gradcheck_float64():
    torch.manual_seed(4)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (2, 3))
    fn = lambda h, w: lp_kernel.hidden_token_logprobs(h, w, tokens, 0.8, with_entropy=True, chunk_size=2)  # noqa
    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_bad_arguments():
    logits, tokens = torch.randn(B, T, V), torch.randint(0, V, (B, T))
    with pytest.raises(ValueError, match="temperature"):
        lp_kernel.token_logprobs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="tokens"):
        lp_kernel.token_logprobs(logits, tokens[:, 1:])


def test_autocast_backward_recomputes_with_the_forwards_dtype():
    """Backward runs outside autocast; the kernel must still recompute bf16 logits, and accept bf16
    hidden states with a float32 head (as under autocast)."""
    import torch
    from rlhf_engine.kernels.logprobs import hidden_reference, hidden_token_logprobs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    tok = torch.randint(0, 40, (2, 5), generator=g)
    grads = []
    for fn in (hidden_token_logprobs, hidden_reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = fn(h, w, tok)
        lp = lp[0] if isinstance(lp, tuple) else lp  # the reference returns (logprobs, entropy)
        h.grad = w.grad = None
        lp.sum().backward()
        grads.append((lp.detach(), h.grad.clone(), w.grad.clone()))
    for ours, ref in zip(*grads):
        assert torch.allclose(ours.float(), ref.float(), atol=3e-2, rtol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = hidden_token_logprobs(h.bfloat16(), w, tok)
    lp.sum().backward()  # no dtype error in backward


@pytest.mark.parametrize("chunk_size", [None, 4, 5])
@pytest.mark.parametrize("autocast", [False, True])
def test_rollout_pass_with_reference(chunk_size, autocast):
    """The rollout's one pass: the policy's log-probs and entropy bit-identical to hidden_token_logprobs (the
    update's function: the first minibatch's ratio is exactly 1), the reference's log-probs and the exact KL
    equal to the full log-softmax's; under bf16 autocast too."""
    g = torch.Generator().manual_seed(3)
    hidden, ref_hidden = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    w, ref_w = torch.randn(V, D, generator=g), torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = lp_kernel.hidden_logprobs_with_reference(hidden, w, ref_hidden, ref_w, tokens, 0.7, chunk_size)
        want_lp, want_h = lp_kernel.hidden_token_logprobs(hidden, w, tokens, 0.7, with_entropy=True,
                                                          chunk_size=chunk_size)
    assert torch.equal(got.logprobs, want_lp) and torch.equal(got.entropy, want_h)
    cast = (lambda x: x.bfloat16()) if autocast else (lambda x: x)
    logp = torch.log_softmax((cast(hidden) @ cast(w).T).float() / 0.7, -1)
    ref_logp = torch.log_softmax((cast(ref_hidden) @ cast(ref_w).T).float() / 0.7, -1)
    assert_close(got.ref_logprobs, ref_logp.gather(-1, tokens[..., None]).squeeze(-1), 1e-5)
    assert_close(got.kl, (logp.exp() * (logp - ref_logp)).sum(-1), 1e-5)
    same = lp_kernel.hidden_logprobs_with_reference(hidden, w, hidden, w, tokens, 0.7, chunk_size)
    assert same.kl.abs().max().item() <= 1e-6  # KL(π‖π) = 0


@pytest.mark.parametrize("with_entropy", [True, False])
def test_kept_blocks_and_recomputed_blocks_give_the_same_gradients(monkeypatch, with_entropy):
    """Backward reuses the forward's log-softmax blocks when they fit SAVE_BYTES, else recomputes them: the
    gradients are bit-identical either way, and a second backward (retain_graph) recomputes. Without an
    entropy gradient backward exponentiates a kept block in place: the second backward must not see that."""
    g = torch.Generator().manual_seed(5)
    hidden, w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)

    def grads(save_bytes, twice=False):
        monkeypatch.setattr(lp_kernel, "SAVE_BYTES", save_bytes)
        h, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        out = lp_kernel.hidden_token_logprobs(h, ww, tokens, 0.8, with_entropy=with_entropy, chunk_size=4)
        loss = loss_of(*out) if with_entropy else loss_of(out, torch.zeros(()))
        first = torch.autograd.grad(loss, (h, ww), retain_graph=twice)
        return (first, torch.autograd.grad(loss, (h, ww))) if twice else first

    kept, recomputed = grads(2**30), grads(0)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))
    first, second = grads(2**30, twice=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_row_reductions_in_slices_equal_whole_blocks(monkeypatch):
    """logsumexp, entropy and the KL run over slices of a block's rows (no [n, V] temporary): slices of 2 rows
    (blocks of 4 and 5 rows, so a short last slice) give the same values and gradients, bit for bit, as one
    slice per block; the logsumexp is torch's, infinite rows included."""
    g = torch.Generator().manual_seed(7)
    hidden, w = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    ref_hidden = torch.randn(B, T, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)

    def run(slice_bytes, chunk):
        monkeypatch.setattr(lp_kernel, "SLICE_BYTES", slice_bytes)
        h, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = lp_kernel.hidden_token_logprobs(h, ww, tokens, 0.9, with_entropy=True, chunk_size=chunk)
        grads = torch.autograd.grad(loss_of(lp, ent), (h, ww))
        ref = lp_kernel.hidden_logprobs_with_reference(hidden, w, ref_hidden, w, tokens, 0.9, chunk)
        return (lp, ent, *grads, *ref)

    for chunk in (4, 5):
        sliced, whole = run(2 * 4 * V, chunk), run(2**30, chunk)
        assert all(torch.equal(a, b) for a, b in zip(sliced, whole))
    monkeypatch.setattr(lp_kernel, "SLICE_BYTES", 2 * 4 * V)
    assert lp_kernel._row_slices(torch.empty(5, V)) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    z = torch.randn(5, V, generator=g) * 30
    z[1] = float("-inf")
    z[3, :2] = float("inf")
    assert torch.equal(lp_kernel._row_logsumexp(z), torch.logsumexp(z, -1, keepdim=True))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_size", [4, 5, None])
def test_a_frozen_head_keeps_the_hidden_gradient_not_the_blocks(dtype, tol, chunk_size, monkeypatch):
    """With the head frozen and no entropy (LoRA SFT, DPO) forward forms d logprob / d hidden, [B, T, D], and
    keeps neither the [n, V] blocks nor the hidden states; backward scales it by each row's gradient. The
    gradient equals the trained-head path's (which keeps the blocks) and the full log-softmax's, and a second
    backward (retain_graph) gives it again. Under no_grad nothing is formed or kept; a double backward raises."""
    g = torch.Generator().manual_seed(11)
    hidden, w = torch.randn(B, T, D, generator=g).to(dtype), torch.randn(V, D, generator=g).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g)  # a different upstream gradient for every position

    def grad_of(fn, head_trains):
        h, ww = hidden.clone().requires_grad_(), w.clone().requires_grad_(head_trains)
        lp = fn(h, ww)
        return lp, torch.autograd.grad((lp * weights).sum(), h, retain_graph=True)[0], h, ww

    frozen_lp, frozen, h, _ = grad_of(
        lambda h, ww: lp_kernel.hidden_token_logprobs(h, ww, tokens, 0.8, chunk_size=chunk_size), False)
    ctx = frozen_lp.grad_fn
    assert ctx.kept is None and ctx.saved_tensors[0] is None  # no blocks, no hidden states kept
    assert ctx.saved_tensors[-1].shape == hidden.shape
    trained_lp, trained, _, _ = grad_of(
        lambda h, ww: lp_kernel.hidden_token_logprobs(h, ww, tokens, 0.8, chunk_size=chunk_size), True)
    assert trained_lp.grad_fn.saved_tensors[-1] is None  # the head trains: the blocks path
    _, want, _, _ = grad_of(lambda h, ww: lp_kernel.hidden_reference(h, ww, tokens, 0.8)[0], False)
    assert torch.equal(frozen_lp, trained_lp) and frozen.dtype == dtype
    assert_close(frozen, trained, tol)
    assert_close(frozen, want, 10 * tol)
    again = torch.autograd.grad((frozen_lp * weights).sum(), h)[0]
    assert torch.equal(again, frozen)
    # the hand rule for one row: d logprob / d hidden = (W[token] - softmax(W h / T) @ W) / T, times the weight
    formed = []
    factor = lp_kernel._logprob_grad_factor
    monkeypatch.setattr(lp_kernel, "_logprob_grad_factor", lambda *a: formed.append(1) or factor(*a))
    with torch.no_grad():  # a leaf that requires grad, but no graph: no factor formed (nor blocks kept)
        idle = lp_kernel.hidden_token_logprobs(hidden.clone().requires_grad_(), w, tokens, 0.8, chunk_size=chunk_size)
    assert idle.grad_fn is None and torch.equal(idle, frozen_lp.detach()) and not formed
    lp_kernel.hidden_token_logprobs(hidden.clone().requires_grad_(), w, tokens, 0.8, chunk_size=chunk_size)
    assert formed  # the spy sees the factor when a gradient can be asked for
    h2 = hidden.clone().requires_grad_()
    lp2 = lp_kernel.hidden_token_logprobs(h2, w, tokens, 0.8)
    (g2,) = torch.autograd.grad(lp2.square().sum(), h2, create_graph=True)  # the upstream 2·lp has a graph
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        g2.sum().backward()
    b, t = 1, 2
    p = torch.softmax(w.double() @ hidden[b, t].double() / 0.8, -1)
    by_hand = weights[b, t] * (w[tokens[b, t]].double() - p @ w.double()) / 0.8
    assert_close(frozen[b, t], by_hand, 10 * tol)


def test_a_frozen_head_with_an_entropy_gradient_takes_the_blocks_path():
    """An entropy output may carry a gradient (PPO's entropy bonus), which d logprob / d hidden cannot give."""
    g = torch.Generator().manual_seed(12)
    hidden, w = torch.randn(B, T, D, generator=g, requires_grad=True), torch.randn(V, D, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    got = lp_kernel.hidden_token_logprobs(hidden, w, tokens, 0.8, with_entropy=True, chunk_size=4)
    assert got[0].grad_fn.saved_tensors[-1] is None
    assert_matches(got, lp_kernel.hidden_reference(hidden, w, tokens, 0.8), (hidden,), 1e-5)
