"""kernels/linear.py: float32 linears through oneDNN, and packed weights for decode, against F.linear."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.generate import SamplingConfig, generate, packed_weights
from rlhf_engine.engine.model.llama import LLaMA, Linear
from rlhf_engine.engine.model.lora import LoRAConfig, LoRALinear, apply_lora
from rlhf_engine.kernels import linear as kl

needs_onednn = pytest.mark.skipif(not kl.available(), reason="torch built without oneDNN")


@pytest.fixture
def small_products_too(monkeypatch):
    """Test-sized products take the fast paths (the thresholds keep them on F.linear for speed alone)."""
    monkeypatch.setattr(kl, "MIN_MACS", 0)
    monkeypatch.setattr(kl, "PACK_MIN_WEIGHTS", 0)


def _float64_grads(x, w, b, upstream):
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = None if b is None else b.double().requires_grad_()
    y = F.linear(x, w, b)
    y.backward(upstream.double())
    return y, x.grad, w.grad, None if b is None else b.grad


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["3d", "2d", "transposed"])
def test_value_and_every_gradient_match_float64(bias, layout, small_products_too):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 48, generator=g)
    x = {"3d": x, "2d": x[0], "transposed": x.transpose(0, 1)}[layout]  # transposed: a strided input
    w, b = torch.randn(40, 48, generator=g), (torch.randn(40, generator=g) if bias else None)
    upstream = torch.randn(*x.shape[:-1], 40, generator=g)
    ref, ref_gx, ref_gw, ref_gb = _float64_grads(x, w, b, upstream)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    if b is not None:
        b.requires_grad_()
    assert kl.uses_onednn(x, w)
    y = kl.linear(x, w, b)
    y.backward(upstream)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=0, atol=2e-5)  # g W, not g Wᵀ (shapes differ anyway)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=0, atol=2e-5)
    if b is not None:
        torch.testing.assert_close(b.grad.double(), ref_gb, rtol=0, atol=2e-5)


@needs_onednn
def test_a_broadcast_upstream_gradient_and_an_empty_batch_work(small_products_too):
    x, w = torch.randn(4, 6, 8, requires_grad=True), torch.randn(5, 8)
    kl.linear(x, w).sum().backward()  # .sum()'s gradient is a zero-stride expand
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 6, 8))
    assert kl.linear(torch.randn(0, 8), w).shape == (0, 5)


def _saved_bytes(fn, *args):
    sizes = []

    def pack_hook(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fn(*args)
    return sum(sizes)


@needs_onednn
@pytest.mark.parametrize("trains", ["input", "weight", "both"])
def test_it_keeps_for_backward_what_f_linear_keeps(trains, small_products_too):
    """A frozen base (LoRA) keeps only its weight, not each layer's input: the memory LoRA training saves."""
    x = torch.randn(64, 96, requires_grad=trains in ("input", "both"))
    w = torch.randn(128, 96, requires_grad=trains in ("weight", "both"))
    assert _saved_bytes(kl.linear, x, w) == _saved_bytes(F.linear, x, w)


@needs_onednn
def test_only_products_worth_a_onednn_call_take_it():
    """A oneDNN call costs more than MKL's: the demo's and the tests' small products stay on F.linear,
    SmolLM2's training products (and the input gradient's g W, counted the same) take oneDNN."""
    assert not kl.uses_onednn(torch.randn(512, 128), torch.randn(352, 128))  # the demo's MLP at 512 rows: 23M
    assert kl.uses_onednn(torch.randn(2048, 576), torch.randn(192, 576))  # SmolLM2's k_proj at SFT's rows
    assert kl.uses_onednn(torch.randn(2048, 192), torch.randn(192, 576))  # its input gradient, g W
    assert kl.uses_onednn(torch.randn(256, 576), torch.randn(576, 576))  # o_proj at 256 rows: 85M
    assert not kl.uses_onednn(torch.randn(16, 1536), torch.randn(576, 1536))  # down_proj at a decode step: 14M
    assert kl.pack(torch.randn(128, 352), 16) is None and kl.pack(torch.randn(192, 576), 16) is not None
    assert kl.pack(torch.randn(128, 352).bfloat16(), 16) is not None or not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_off_the_fast_path_it_is_f_linear_bit_for_bit():
    x, w = torch.randn(7, 16), torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the dtype: F.linear's business
        assert not kl.uses_onednn(x, w)
        assert torch.equal(kl.linear(x, w), F.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert not kl.uses_onednn(xb, wb)
    assert torch.equal(kl.linear(xb, wb), F.linear(xb, wb))
    assert torch.equal(kl.linear(x.double(), w.double()), F.linear(x.double(), w.double()))


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_f_linears_values_at_any_row_count(dtype, small_products_too):
    w = torch.randn(96, 64).to(dtype)
    packed = kl.pack(w, 16)
    for rows in (1, 5, 16, 40):
        x = torch.randn(rows, 64).to(dtype)
        with torch.no_grad():
            y = kl.linear(x, w, packed=packed)
        atol = 1e-4 if dtype == torch.float32 else 0  # bf16: the same oneDNN kernel, bit for bit
        torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=0, atol=atol)


@needs_onednn
def test_packed_weights_follow_autocast_and_step_aside_for_gradients(small_products_too):
    w = torch.randn(24, 32).bfloat16()
    packed = kl.pack(w, 16)
    x = torch.randn(6, 32)  # float32 activations, bf16 weight: autocast casts x
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(kl.linear(x, w, packed=packed), F.linear(x, w))
    wf = torch.randn(24, 32, requires_grad=True)
    xf = torch.randn(6, 32)
    stale = kl.pack(torch.zeros(24, 32), 16)  # were it used, the output would be zero
    y = kl.linear(xf, wf, packed=stale)
    y.sum().backward()
    torch.testing.assert_close(y, F.linear(xf, wf))
    assert wf.grad is not None


def _tiny(seed=0, lora=False):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = LLaMA(cfg).eval()
    if lora:
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_b, std=0.1)  # a live adapter: its update is not zero
    return model


@needs_onednn
def test_packed_weights_context_fills_every_float_linear_and_empties_it_even_on_error(small_products_too):
    model = _tiny(lora=True)
    slots = [m for m in model.modules() if isinstance(m, (Linear, LoRALinear))]
    assert len(slots) == 15  # 2 layers x 7 projections, q and v adapted, and the LM head
    with pytest.raises(RuntimeError, match="inside"):
        with packed_weights(model, 4):
            assert all(m.packed is not None and m.packed.shape == m.weight.shape for m in slots)
            raise RuntimeError("inside")
    assert all(m.packed is None for m in slots)


@needs_onednn
def test_nothing_is_packed_where_the_copies_would_crowd_memory(small_products_too, monkeypatch):
    model = _tiny()
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    monkeypatch.setattr("rlhf_engine.engine.model.generate.available_memory", lambda: 4 * weights - 4)
    with packed_weights(model, 4):
        assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    monkeypatch.setattr("rlhf_engine.engine.model.generate.available_memory", lambda: 4 * weights)
    with packed_weights(model, 4):
        assert all(m.packed is not None for m in model.modules() if isinstance(m, Linear))


@needs_onednn
@pytest.mark.parametrize("lora", [False, True])
def test_decoding_with_packed_weights_samples_what_unpacked_weights_sample(lora, monkeypatch, small_products_too):
    model = _tiny(lora=lora)
    prompts = [[1, 5, 9, 3], [2, 7], [4, 4, 4, 4, 4, 6]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=3)
    packs = []
    counting = lambda w, rows: packs.append(w.dtype) or kl.pack(w, rows)  # noqa: E731
    monkeypatch.setattr("rlhf_engine.engine.model.generate.pack", counting)
    packed = generate(model, prompts, cfg, eos_id=0, pad_id=63)
    assert packs == [torch.float32] * 15  # every projection of both layers and the LM head, once a call
    monkeypatch.setattr("rlhf_engine.engine.model.generate.pack", lambda weight, rows: None)
    plain = generate(model, prompts, cfg, eos_id=0, pad_id=63)
    assert torch.equal(packed.response_tokens, plain.response_tokens)
    torch.testing.assert_close(packed.response_logprobs, plain.response_logprobs, rtol=0, atol=1e-5)


@needs_onednn
def test_one_token_to_draw_packs_nothing(monkeypatch, small_products_too):
    """With max_new_tokens 1 there is no decode step, so packing would be pure cost."""
    model = _tiny()
    packs = []
    counting = lambda w, rows: packs.append(w.dtype) or kl.pack(w, rows)  # noqa: E731
    monkeypatch.setattr("rlhf_engine.engine.model.generate.pack", counting)
    generate(model, [[1, 5, 9], [2, 7]], SamplingConfig(max_new_tokens=1, seed=0), eos_id=0, pad_id=63)
    assert packs == []
    generate(model, [[1, 5, 9], [2, 7]], SamplingConfig(max_new_tokens=2, seed=0), eos_id=-1, pad_id=63)
    assert len(packs) == 15


@pytest.mark.skipif(not (kl.available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()), reason="no CPU bf16")
def test_float32_masters_under_autocast_are_packed_in_bf16_and_decode_the_same(monkeypatch, small_products_too):
    """bf16 training of a float32 model (full fine-tuning): F.linear multiplies by the weight cast to bf16, so
    that cast is what gets packed; a float32 copy would never be used."""
    model = _tiny()
    prompts = [[1, 5, 9, 3], [2, 7]]
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=1)
    packs = []
    counting = lambda w, rows: packs.append(w.dtype) or kl.pack(w, rows)  # noqa: E731
    monkeypatch.setattr("rlhf_engine.engine.model.generate.pack", counting)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = generate(model, prompts, cfg, eos_id=0, pad_id=63)
        monkeypatch.setattr("rlhf_engine.engine.model.generate.pack", lambda weight, rows: None)
        plain = generate(model, prompts, cfg, eos_id=0, pad_id=63)
    assert packs == [torch.bfloat16] * 15
    assert torch.equal(packed.response_tokens, plain.response_tokens)
    assert torch.equal(packed.response_logprobs, plain.response_logprobs)


@needs_onednn
def test_under_torch_compile_it_leaves_the_product_to_inductor(small_products_too):
    """Inductor cannot lower the oneDNN op with the weight as an input (only frozen, as a constant): compiled
    code must see F.linear. Forward and gradient equal the eager kernel's."""
    w = torch.randn(24, 16, requires_grad=True)
    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(lambda a, b: kl.linear(a, b).square().sum(), backend="inductor", fullgraph=True)
    loss = compiled(x, w)
    loss.backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    eager = kl.linear(x, w).square().sum()
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads, (x.grad, w.grad))
