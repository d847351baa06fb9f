"""kernels/attention.py: blocked causal attention against torch's SDPA, in float64, and inside the model."""
import pytest
import torch

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.kernels import attention as ka


@pytest.fixture
def short_rows_too(monkeypatch):
    """Test-sized sequences take the blocked path, in several blocks (the bar keeps them on SDPA for speed)."""
    monkeypatch.setattr(ka, "MIN_LENGTH", 2)
    monkeypatch.setattr(ka, "BLOCK", 8)


def _qkv(B, H, KV, T, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, d, generator=g) for n in (H, KV, KV)], torch.randn(B, H, T, d, generator=g)


@pytest.mark.parametrize("B,H,KV,T,d", [(2, 4, 2, 37, 8), (1, 9, 3, 8, 16), (2, 3, 3, 21, 4), (1, 2, 1, 2, 4),
                                        (3, 6, 2, 64, 8)])
def test_output_and_every_gradient_match_float64_sdpa(B, H, KV, T, d, short_rows_too):
    """GQA (a kv head per 1-3 query heads), T a multiple of the block, not one, shorter than one, two tokens."""
    (q, k, v), upstream = _qkv(B, H, KV, T, d)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = ka.reference(*ref)
    want.backward(upstream.double())
    got_in = [t.clone().requires_grad_() for t in (q, k, v)]
    assert ka.uses_blocked(got_in[0], got_in[1])
    got = ka.causal_attention(*got_in)
    got.backward(upstream)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    for mine, theirs in zip(got_in, ref):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0, atol=1e-5)


def test_a_query_never_sees_a_later_key(short_rows_too):
    """Changing the last position's key and value changes no earlier output (the diagonal block's mask)."""
    (q, k, v), _ = _qkv(1, 4, 2, 20, 8)
    before = ka.causal_attention(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5.0
    v2[:, :, -1] -= 3.0
    after = ka.causal_attention(q, k2, v2)
    assert torch.equal(before[:, :, :-1], after[:, :, :-1])
    assert not torch.allclose(before[:, :, -1], after[:, :, -1])


def test_only_long_float32_cpu_sequences_take_the_blocked_path():
    (q, k, _), _ = _qkv(1, 4, 2, ka.MIN_LENGTH, 8)
    assert ka.uses_blocked(q, k)
    assert not ka.uses_blocked(q[:, :, :-1], k[:, :, :-1])  # shorter than MIN_LENGTH: SDPA is as fast
    assert not ka.uses_blocked(q.bfloat16(), k.bfloat16())
    assert not ka.uses_blocked(q[:, :, :-1], k)  # queries against a longer cache: not self-attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ka.uses_blocked(q, k)


def test_without_gradients_it_builds_no_graph_and_equals_sdpa(short_rows_too):
    (q, k, v), _ = _qkv(1, 4, 2, 20, 8)
    q.requires_grad_()
    with torch.no_grad():
        out = ka.causal_attention(q, k, v)
    assert out.grad_fn is None
    torch.testing.assert_close(out, ka.reference(q, k, v).detach(), rtol=0, atol=2e-6)


def test_the_output_may_be_edited_in_place_with_one_query_head_per_kv_head(short_rows_too):
    """With g = 1 the kernel's result would be a view of the output it keeps for backward; SDPA's caller may edit
    its output in place, so the blocked one must allow it too, and the gradient must not see the edit."""
    (q, k, v), upstream = _qkv(1, 2, 2, 20, 8)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ka.causal_attention(q, k, v)
    out.mul_(2.0)
    out.backward(upstream)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    (ka.reference(*ref) * 2.0).backward(upstream.double())
    for mine, theirs in zip((q, k, v), ref):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0, atol=1e-5)


def test_float32_masters_under_bf16_autocast_attend_in_float32(monkeypatch, short_rows_too):
    """Full fine-tuning in bf16 keeps float32 weights under autocast: q arrives in float32 (rotary's float32
    cos/sin), and attention must run in float32 (blocked), not be cast down to bf16 SDPA."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=64)
    model = LLaMA(cfg).init_weights(std=0.1)
    calls = []
    real = ka._BlockedCausal.apply
    monkeypatch.setattr(ka._BlockedCausal, "apply", lambda *a: calls.append(a[0].dtype) or real(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 24)))
    assert calls == [torch.float32] * cfg.n_layers


@pytest.mark.parametrize("padded", [False, True])
def test_the_model_trains_the_same_through_either_kernel(padded, monkeypatch):
    """A tiny LLaMA's loss and gradients with every causal call blocked equal those through SDPA: whole rows
    (the plain causal path) and ragged rows (varlen groups, `attend_rows`)."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=64)
    model = LLaMA(cfg).init_weights(std=0.1)
    tokens = torch.randint(0, 64, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    if padded:
        mask[0, :7] = 0
        mask[2, 25:] = 0

    def loss_and_grads():
        model.zero_grad()
        logits = model(tokens, attention_mask=mask)
        loss = (logits.log_softmax(-1) * mask[..., None]).sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(ka, "MIN_LENGTH", 10**9)
    want_loss, want_grads = loss_and_grads()
    monkeypatch.setattr(ka, "MIN_LENGTH", 2)
    monkeypatch.setattr(ka, "BLOCK", 8)
    calls = []
    real = ka._BlockedCausal.apply
    monkeypatch.setattr(ka._BlockedCausal, "apply", lambda *a: calls.append(1) or real(*a))
    got_loss, got_grads = loss_and_grads()
    assert len(calls) >= cfg.n_layers  # the blocked kernel did run
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
