"""Frozen 8-bit linear layers (LLM.int8 storage) and the model-level swap used by `--load-in-8bit`.

`Int8Linear` stores a frozen nn.Linear's weight as int8 [out, in] under the same `weight` key, plus
`weight_scale` float32 [out] (row absmax / 127: the float weight is ~ weight * weight_scale[:, None]). It has
no parameters: nothing in it trains and no float copy of the weight is kept. Its forward is one call into
kernels/int8_matmul.py, which gives the gradient with respect to the input, so LoRA adapters on top (see
`functional_forward`) and trainable layers below still learn. `quantize_model` swaps nn.Linear modules in
place by name; `Int8Linear.dequantize` gives the float weight back (merging LoRA, exporting).

Loading big checkpoints: build the model on the meta device, `quantize_model` it there (no memory), then
assign tensors one at a time; an Int8Linear quantises a floating `weight` as it is assigned (see
`_load_from_state_dict`), so at most one float tensor is ever alive. `quantize_linear_state` is the same
step as a pure function for loaders that build state dicts themselves.

Why `weight_scale` and not bitsandbytes' `SCB`: SCB is the row absmax (bitsandbytes dequantises with
SCB / 127); ours is the multiplier itself, as in gpt-fast's WeightOnlyInt8Linear `scales`, and the name
says so. A bitsandbytes-format state dict (weight int8 + SCB) still loads: SCB / 127 is converted.

References: Dettmers et al. 2022, LLM.int8(); bitsandbytes nn.Linear8bitLt; gpt-fast quantize.py.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from rlhf_engine.engine.model.llama import Linear
from rlhf_engine.kernels.int8_matmul import dequantize_int8, int8_linear, quantize_int8

__all__ = ["Int8Linear", "quantize_int8", "dequantize_int8", "quantize_model", "quantize_on_load",
           "quantize_linear_state"]


class Int8Linear(nn.Module):
    """A frozen linear layer: buffers weight int8 [out, in], weight_scale float32 [out], optional bias [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, threshold: float = 6.0,
                 impl: str | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.threshold = threshold  # LLM.int8 outlier magnitude; 0 disables the float outlier columns
        self.impl = impl  # kernels/int8_matmul.py implementation; None: the measured default for the device
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Int8Linear":
        """Quantise `linear` (works on the meta device too: the result is then an empty shell to load into)."""
        layer = cls(linear.in_features, linear.out_features, bias=False, threshold=threshold, device="meta")
        layer.weight, layer.weight_scale = quantize_int8(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.functional_forward(self, x)

    @property
    def functional_forward(self):
        """forward(module, x) for any module holding this layer's tensors under the same names, with this
        layer's threshold and impl: a LoRALinear that adopts them calls it for its base path."""
        return functools.partial(_forward, threshold=self.threshold, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, impl={self.impl}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Accept three forms under `weight`: int8 + weight_scale (ours), int8 + SCB (bitsandbytes), or a
        # float weight (an ordinary checkpoint), quantised here so a loader never keeps the float tensor.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.is_floating_point():
            state_dict = {**state_dict, **quantize_linear_state(weight, prefix)}
        elif prefix + "SCB" in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "weight_scale"] = state_dict.pop(prefix + "SCB").float() / 127
        if prefix + "weight_scale" in state_dict:  # a loader may have cast every floating tensor to bf16
            state_dict = {**state_dict, prefix + "weight_scale": state_dict[prefix + "weight_scale"].float()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts every floating buffer; keep the scales float32 (bitsandbytes keeps
        # SCB float32 too) so a bf16 model does not carry a per-row gain error of up to 2**-9.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:  # a cast, not only a move (or to_empty): undo the cast
            self.weight_scale = scale.to(self.weight_scale.device)
        return self


def _forward(module: nn.Module, x: torch.Tensor, threshold: float, impl: str | None) -> torch.Tensor:
    return int8_linear(x, module.weight, module.weight_scale, module.bias, threshold=threshold, impl=impl)


def quantize_linear_state(weight: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """{prefix + 'weight': int8 [out, in], prefix + 'weight_scale': float32 [out]} from a float weight."""
    qweight, scale = quantize_int8(weight)
    return {prefix + "weight": qweight, prefix + "weight_scale": scale}


def quantize_model(model: nn.Module, skip: tuple[str, ...] = ("lm_head", "score"), threshold: float = 6.0) -> nn.Module:
    """Replace, in place, every plain linear (nn.Linear or the model's llama.Linear) whose dotted name contains
    no `skip` entry by an Int8Linear.

    The heads stay in full precision by default: lm_head (bitsandbytes and StackLLaMA skip it too) and the
    reward/value model's `score` head, which trains. LoRA layers are left alone: quantise first, then add
    adapters. On the meta device this only changes module types.
    """
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) in (nn.Linear, Linear) and not any(s in name for s in skip):
                setattr(parent, child_name, Int8Linear.from_linear(child, threshold))
    return model


def quantize_on_load(model: nn.Module) -> nn.Module:
    """The `transform` for engine.checkpoint.load_checkpoint (`--load-in-8bit`): applied to the model on the
    meta device it only swaps module types; each Int8Linear then quantises its weight as it is assigned."""
    return quantize_model(model)
