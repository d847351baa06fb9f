"""8-bit frozen linears: the int8 storage round trip, Int8Linear against nn.Linear, every implementation of
kernels/int8_matmul.py that runs here against the reference, state-dict keys and loading, quantize_model,
and that trainable layers around frozen int8 layers learn.

Error budget used below (relative Frobenius error, Gaussian data): rounding the weight to 255 levels per row
costs ~ absmax / 127 / sqrt(12) per weight, 6-8e-3 of the output at these widths; the LLM.int8 paths
(int_mm, bitsandbytes) also round the activations per row, the same size again, 0.9-1.1e-2 in total.
"""
import copy
import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch import nn

from rlhf_engine.engine.model.int8 import (Int8Linear, dequantize_int8, quantize_int8, quantize_linear_state,
                                           quantize_model)
from rlhf_engine.kernels import int8_matmul

IMPLS = [impl for impl in int8_matmul.IMPLS if int8_matmul.available(impl, "cpu")]
FAST_IMPLS = [impl for impl in IMPLS if impl != "reference"]
TOLERANCE = {"reference": 1e-2, "int_mm": 1.5e-2, "bitsandbytes": 1.5e-2}  # see the error budget above


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def train(parameters, loss_fn, steps: int, lr: float) -> list[float]:
    """Adam on `parameters` for `steps` steps of loss_fn(); returns the losses seen."""
    opt = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def forward_and_input_grad(layer, x, grad_out):
    x = x.detach().requires_grad_()
    y = layer(x)
    (grad_x,) = torch.autograd.grad(y, x, grad_out.to(y.dtype))
    return y, grad_x


# ---- storage format ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_is_at_most_half_a_step_per_row(dtype):
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows four decades apart
    w[3] = 0.0  # an all-zero row must not divide by zero
    w[5, 7] = 40.0  # one outlier sets its row's step
    w = w.to(dtype)
    original = w.clone()
    q, scale = quantize_int8(w)
    assert torch.equal(w, original)  # pure
    assert q.dtype == torch.int8 and q.shape == (64, 96)
    assert scale.dtype == torch.float32 and scale.shape == (64,)
    deq = dequantize_int8(q, scale)
    # round to nearest on a grid of step scale = absmax / 127: |w - q * scale| <= scale / 2 (+ float32 slack)
    assert ((w.float() - deq).abs() <= scale[:, None] * (0.5 + 1e-5)).all()
    assert (deq[3] == 0).all()
    nonzero = torch.arange(64) != 3
    assert (q[nonzero].abs().amax(1) == 127).all()  # each row's absmax lands exactly on +-127
    assert dequantize_int8(q, scale, torch.bfloat16).dtype == torch.bfloat16


def test_quantize_linear_state_matches_from_linear():
    linear = nn.Linear(32, 16, bias=False)
    state = quantize_linear_state(linear.weight, prefix="layer.")
    layer = Int8Linear.from_linear(linear)
    assert set(state) == {"layer.weight", "layer.weight_scale"}
    assert torch.equal(state["layer.weight"], layer.weight) and torch.equal(state["layer.weight_scale"],
                                                                          layer.weight_scale)


# ---- the layer against nn.Linear, and implementations against each other ------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_int8_linear_matches_float_linear(impl, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=True)
    layer = Int8Linear.from_linear(linear)
    layer.impl = impl
    x, grad_out = torch.randn(4, 9, 256), torch.randn(4, 9, 128)
    y_ref, gx_ref = forward_and_input_grad(linear, x, grad_out)
    y, gx = forward_and_input_grad(layer, x.to(dtype), grad_out)
    assert y.dtype == dtype and gx.dtype == dtype and y.shape == (4, 9, 128)
    assert rel_err(y, y_ref) < TOLERANCE[impl]
    assert rel_err(gx, gx_ref) < TOLERANCE[impl]


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_empty_batches_and_inference_mode(impl):
    linear = nn.Linear(64, 32)
    layer = Int8Linear.from_linear(linear)
    layer.impl = impl
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):  # the stages' bf16 mode
        y = layer(x)
        assert rel_err(y, linear(x)) < TOLERANCE[impl] + 1e-2  # + bf16 rounding of the reference path
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert layer(torch.randn(0, 64)).shape == (0, 32)
    with torch.inference_mode():
        assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 32)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_fast_path_agrees_with_reference(impl):
    torch.manual_seed(1)
    q, scale = quantize_int8(torch.randn(96, 200) * 0.05)
    x, grad_out = torch.randn(33, 200), torch.randn(33, 96)
    outputs = {}
    for name in ("reference", impl):
        x_leaf = x.clone().requires_grad_()
        y = int8_matmul.int8_linear(x_leaf, q, scale, impl=name)
        outputs[name] = (y, torch.autograd.grad(y, x_leaf, grad_out)[0])
    # only the activation (and, for int_mm, gradient) rounding separates them: ~7e-3 here
    assert rel_err(outputs[impl][0], outputs["reference"][0]) < 1e-2
    assert rel_err(outputs[impl][1], outputs["reference"][1]) < 1e-2


@pytest.mark.skipif(not {"int_mm", "bitsandbytes"} <= set(IMPLS), reason="needs both LLM.int8 paths")
def test_int_mm_is_the_same_algorithm_as_bitsandbytes():
    torch.manual_seed(2)
    q, scale = quantize_int8(torch.randn(64, 128) * 0.05)
    x = torch.randn(20, 128)
    x[:, 5] *= 20  # an outlier column, split off by both
    ours = int8_matmul.int8_linear(x, q, scale, impl="int_mm")
    theirs = int8_matmul.int8_linear(x, q, scale, impl="bitsandbytes")
    # Not bit-equal: bitsandbytes rounds x to fp16 first, moves whole outlier columns to float (every row's
    # entries in them) and takes each row's absmax before zeroing them; we move each row's own outliers only.
    assert rel_err(ours, theirs) < 5e-3


@pytest.mark.parametrize("impl", [i for i in FAST_IMPLS])
def test_outlier_columns_are_kept_in_float(impl):
    torch.manual_seed(3)
    w = torch.randn(64, 128) * 0.05
    q, scale = quantize_int8(w)
    x = torch.randn(16, 128)
    x[:, [3, 70]] *= 30  # LLM.int8's systematic outlier features
    exact = x @ dequantize_int8(q, scale).t()
    split = rel_err(int8_matmul.int8_linear(x, q, scale, threshold=6.0, impl=impl), exact)
    plain = rel_err(int8_matmul.int8_linear(x, q, scale, threshold=0.0, impl=impl), exact)
    assert split < 1e-2 < plain and split < plain / 3


def test_a_rows_output_does_not_depend_on_the_rows_beside_it():
    """The outlier split is per row: a column another row flags stays quantised for this one, so a row scored
    alone or in any batch gives the same output (PPO's minibatches re-score the rollout's rows in other
    company; moving whole columns, as bitsandbytes does, put SmolLM2's log-probs up to 1.45 nats apart).
    Called directly: torch._int_mm runs on every CPU, only slowly without AVX-512."""
    torch.manual_seed(4)
    w = torch.randn(64, 128) * 0.05
    q, scale = quantize_int8(w)
    x = torch.randn(8, 128)
    x[0, [3, 70]] = 40.0  # row 0 alone carries outliers
    together = int8_matmul.fast_int_mm(x, q, scale, 6.0)
    for r in range(8):
        alone = int8_matmul.fast_int_mm(x[r:r + 1], q, scale, 6.0)
        torch.testing.assert_close(together[r:r + 1], alone, rtol=0, atol=1e-6 * together.abs().max().item())
    exact = x @ dequantize_int8(q, scale).t()  # row 0's outliers are still multiplied in float
    assert rel_err(together[:1], exact[:1]) < 1e-2 < rel_err(int8_matmul.fast_int_mm(x[:1], q, scale, 0.0), exact[:1])


@pytest.mark.skipif("int_mm" not in IMPLS, reason="torch._int_mm CPU fast path not used on this machine")
def test_cpu_int_mm_accumulates_exactly():
    # CPU _int_mm once overflowed its accumulator on extreme values (pytorch#136942); this guards the machine.
    a = torch.full((8, 4096), 127, dtype=torch.int8)
    a[1::2] = -127
    b = torch.randint(-127, 128, (4096, 24), dtype=torch.int8)
    b[:, :4] = 127
    assert torch.equal(torch._int_mm(a, b), a.int() @ b.int())


# ---- frozen: no parameters, no float copy of the weight saved for backward ------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_trains_and_no_float_weight_is_saved(impl):
    layer = Int8Linear.from_linear(nn.Linear(40, 24, bias=True))
    layer.impl = impl
    assert list(layer.parameters()) == []
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert not any(b.requires_grad for b in layer.buffers())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(5, 40, requires_grad=True))
    assert not any(t.is_floating_point() and t.shape == layer.weight.shape for t in saved)
    y.sum().backward()
    assert all(b.grad is None for b in layer.buffers())


# ---- state dict, dtype moves and loading ---------------------------------------------------------------

def test_state_dict_keys_and_loading_forms():
    linear = nn.Linear(16, 8, bias=True)
    layer = Int8Linear.from_linear(linear)
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    assert set(Int8Linear.from_linear(nn.Linear(16, 8, bias=False)).state_dict()) == {"weight", "weight_scale"}

    from_float = Int8Linear(16, 8, bias=True)
    from_float.load_state_dict(linear.state_dict())  # a float checkpoint is quantised as it loads
    from_int8 = Int8Linear(16, 8, bias=True)
    from_int8.load_state_dict(layer.state_dict())
    from_bnb = Int8Linear(16, 8, bias=True)  # bitsandbytes' layout: SCB is the row absmax
    from_bnb.load_state_dict({"weight": layer.weight, "SCB": layer.weight_scale * 127, "bias": linear.bias})
    for other in (from_float, from_int8, from_bnb):
        assert torch.equal(other.weight, layer.weight) and torch.equal(other.bias, layer.bias)
        torch.testing.assert_close(other.weight_scale, layer.weight_scale)


def test_casting_the_model_keeps_int8_weight_and_float32_scales():
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(16, 8, bias=True))).to(torch.bfloat16)
    layer = model[0]
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert model(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def make_net():
    """A stand-in for the LLaMA module tree: the real projection names, a norm, and both heads."""
    block = nn.ModuleDict({"q_proj": nn.Linear(16, 16, bias=False), "down_proj": nn.Linear(16, 16, bias=False),
                           "norm": nn.LayerNorm(16)})
    return nn.ModuleDict({"layers": nn.ModuleList([block]), "lm_head": nn.Linear(16, 32, bias=False),
                          "score": nn.Linear(16, 1, bias=False)})


def test_quantize_model_swaps_by_name_and_skips():
    model = quantize_model(make_net())
    block = model["layers"][0]
    assert isinstance(block["q_proj"], Int8Linear) and isinstance(block["down_proj"], Int8Linear)
    assert type(model["lm_head"]) is nn.Linear and type(model["score"]) is nn.Linear  # default skip
    assert isinstance(block["norm"], nn.LayerNorm)
    assert "layers.0.q_proj.weight_scale" in model.state_dict()

    model = quantize_model(make_net(), skip=("down_proj",))
    assert type(model["layers"][0]["down_proj"]) is nn.Linear and isinstance(model["lm_head"], Int8Linear)

    class Adapted(nn.Linear):  # e.g. a LoRA layer: subclasses are not plain linears and stay
        pass
    model = nn.Sequential(Adapted(4, 4))
    assert type(quantize_model(model)[0]) is Adapted


def test_meta_model_loads_a_float_checkpoint_one_tensor_at_a_time():
    torch.manual_seed(4)
    source = make_net()
    expected = quantize_model(copy.deepcopy(source)).state_dict()
    with torch.device("meta"):
        model = make_net()
    quantize_model(model)  # on meta: only module types change
    for name, tensor in source.state_dict().items():  # as a streaming loader does, casting floats to bf16
        model.load_state_dict({name: tensor.to(torch.bfloat16)}, strict=False, assign=True)
    state = model.state_dict()
    assert set(state) == set(expected) and not any(t.is_meta for t in state.values())
    assert state["layers.0.q_proj.weight"].dtype == torch.int8
    assert state["layers.0.q_proj.weight_scale"].dtype == torch.float32
    # bf16 rounding of the source moves a few weights by one step at most
    assert (state["layers.0.q_proj.weight"].int() - expected["layers.0.q_proj.weight"].int()).abs().max() <= 1


# ---- training through frozen int8 layers ------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_layers_below_and_above_frozen_int8_layers_learn(impl):
    torch.manual_seed(5)
    frozen = [Int8Linear.from_linear(nn.Linear(16, 64)), Int8Linear.from_linear(nn.Linear(64, 64))]
    for layer in frozen:
        layer.impl = impl
    below, above = nn.Linear(8, 16), nn.Linear(64, 1)
    net = nn.Sequential(below, frozen[0], nn.ReLU(), frozen[1], nn.ReLU(), above)
    x = torch.randn(256, 8)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    assert len(list(net.parameters())) == 4  # only the two float layers' weights and biases
    losses = train(net.parameters(), lambda: nn.functional.mse_loss(net(x), y), steps=150, lr=1e-2)
    assert below.weight.grad.abs().sum() > 0  # the gradient crossed both int8 layers
    assert losses[-1] < 0.3 * losses[0]


def test_lora_on_an_int8_base_trains_and_merges_to_full_precision():
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora, mark_only_lora_trainable, merge_lora
    torch.manual_seed(6)
    model = quantize_model(make_net())
    x = torch.randn(64, 16)
    base_out = model["layers"][0]["q_proj"](x)
    target = base_out + x @ torch.randn(16, 2) @ torch.randn(2, 16) / 4  # a rank-2 change: rank 4 can fit it
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=("q_proj",)))
    layer = model["layers"][0]["q_proj"]
    assert layer.weight.dtype == torch.int8 and "layers.0.q_proj.weight_scale" in model.state_dict()
    assert torch.equal(layer(x), base_out)  # lora_b starts at zero
    mark_only_lora_trainable(model)
    adapters = [p for p in model.parameters() if p.requires_grad]
    losses = train(adapters, lambda: nn.functional.mse_loss(layer(x), target), steps=60, lr=3e-2)
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        adapted = layer(x)
        merge_lora(model)
        merged = layer(x)
    assert layer.weight.dtype == torch.float32
    # merged runs a float matmul with the dequantised weight; before, the base path was the int8 kernel
    assert rel_err(merged, adapted) < TOLERANCE[int8_matmul.default_impl("cpu")]


def test_available_imports_nothing_and_cpu_default():
    code = ("import sys, torch; from rlhf_engine.kernels import int8_matmul as k; "
            "[k.available(i, d) for i in k.IMPLS for d in ('cpu', 'cuda')]; print(k.default_impl('cpu')); "
            "assert 'bitsandbytes' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    expected = "int_mm" if int8_matmul.available("int_mm", "cpu") else "reference"
    assert out.stdout.strip() == expected


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_gradients_of_an_8bit_model_match_the_float_model(dtype):
    """The 8-bit speed path end to end: int8 forward and int8 input-gradient backward through every frozen
    linear of a model, then the LoRA gradients of a PPO-style log-prob loss, against the float model's.
    Measured relative error on this seed: ~2e-2 in fp32 and ~3e-2 under bf16 autocast; bound 5e-2."""
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora, mark_only_lora_trainable
    from rlhf_engine.engine.model.llama import LLaMA
    from rlhf_engine.kernels.logprobs import hidden_token_logprobs
    cfg = ModelConfig.preset("tiny", vocab_size=256)
    base = LLaMA(cfg).init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    grads = {}
    for name in ("float", "int8"):
        model = copy.deepcopy(base)
        if name == "int8":
            quantize_model(model)
        apply_lora(model, LoRAConfig(r=4, dropout=0.0))
        mark_only_lora_trainable(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("lora_a", "lora_b")):  # the same adapters in both; B non-zero so A gets a gradient
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(zlib.crc32(n.encode())))
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
            hidden = model.model(tokens[:, :-1])
            loss = -hidden_token_logprobs(hidden, model.lm_head.weight, tokens[:, 1:]).mean()
        loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
    assert grads["float"].abs().max() > 0
    err = rel_err(grads["int8"], grads["float"])
    assert err < 5e-2, err
