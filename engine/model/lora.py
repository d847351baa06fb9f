"""LoRA (Hu et al. 2021): a frozen linear plus trainable low-rank updates, y = W x + (α/r)·B A x.

`LoRALinear` keeps the base layer's `weight` (and `bias`, and an 8-bit base's `weight_scale`) under
the same state-dict keys and holds any number of named adapters, one active at a time: the one a
stage trains is "default" (as in PEFT); PPO adds "reward" and "value" adapters to the same frozen
base, so one base serves policy, reference (`disable_lora`), reward and value. `lora_b` starts at
zero, so a new adapter changes nothing until training moves it. Adapters on disk (PEFT's layout) are
engine/weights/adapters.py.

References: torchtune modules/peft/lora.py, litgpt lora.py (idempotent merge), PEFT's LoRA layer
(key names `lora_A.weight`/`lora_B.weight`, kaiming-uniform init of A, named adapters).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from rlhf_engine.engine.model.llama import Linear
from rlhf_engine.kernels.int8_matmul import dequantize_int8
from rlhf_engine.kernels.linear import linear
from rlhf_engine.kernels.lora import lora_update

DEFAULT_TARGETS = ("q_proj", "v_proj")  # StackLLaMA's choice
NEVER_TARGETED = ("lm_head", "score")  # heads are trained whole (or not at all), never through LoRA
DEFAULT = "default"


@dataclass(frozen=True)
class LoRAConfig:
    r: int = field(default=16, metadata={"help": "LoRA rank"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS,
                                     metadata={"help": "linear layer names to adapt, or all-linear"})

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one layer (or all-linear)")


class Adapter(nn.Module):
    """One low-rank update (α/r)·B·A·dropout(x)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.r, self.scaling = r, alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        if device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as PEFT and nn.Linear
        self.dropout = dropout

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick their dtype (a cast
            x = x.to(self.lora_a.dtype)  # here would be undone there: bf16 -> fp32 -> bf16, a copy for nothing)
        # dropout's mask kept as bytes, and x shared with the layer's other adapters when no cast copied it
        # (kernels/lora.py)
        return lora_update(x, self.lora_a, self.lora_b, self.scaling, self.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling  # [out, in]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, name: str = DEFAULT):
        super().__init__()
        # Take over the base layer's tensors under their own names (weight, bias, weight_scale, ...).
        for pname, p in base.named_parameters(recurse=False):
            self.register_parameter(pname, p)
        for bname, b in base.named_buffers(recurse=False):
            self.register_buffer(bname, b)
        if "bias" not in self._parameters and "bias" not in self._buffers:
            self.bias = None
        self.base_forward = getattr(base, "functional_forward", None)  # e.g. Int8Linear's kernel call
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.train(base.training)
        self.active: str | None = DEFAULT  # a layer without the active adapter behaves as its base
        self.merged = False  # weight already holds W + the default adapter's update
        self.disabled = False  # inside disable_lora: behave exactly as the base layer
        self.packed = None  # the base weight in oneDNN's layout while generate decodes (llama.Linear's)
        self.add_adapter(name, r, alpha, dropout)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0) -> Adapter:
        if name in self.adapters:
            raise ValueError(f"LoRA adapter {name!r} already exists")
        if self.merged:
            raise ValueError("cannot add an adapter to a layer whose default adapter is merged")
        dtype = self.weight.dtype if self.weight.is_floating_point() else torch.float32
        adapter = Adapter(self.in_features, self.out_features, r, alpha, dropout, self.weight.device, dtype)
        self.adapters[name] = adapter.train(self.training)  # a model in eval mode gets an adapter in eval mode
        return adapter

    # The default adapter's tensors, for code that trains or saves a single adapter.
    @property
    def lora_a(self) -> nn.Parameter:
        return self.adapters[DEFAULT].lora_a

    @property
    def lora_b(self) -> nn.Parameter:
        return self.adapters[DEFAULT].lora_b

    def forward(self, x):
        if self.base_forward is not None:
            y = self.base_forward(self, x)
        else:
            y = linear(x, self.weight, self.bias, self.packed)
        if self.disabled or self.active not in self.adapters or (self.merged and self.active == DEFAULT):
            return y
        return y + self.adapters[self.active](x).to(y.dtype)

    def switch_state(self):
        """What decides which update the forward adds; activation checkpointing replays it."""
        return self.active, self.disabled

    def set_switch_state(self, state) -> None:
        self.active, self.disabled = state

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={a.r} scaling={a.scaling:g} dropout={a.dropout:g}"
                             for n, a in self.adapters.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{adapters}]"


def _targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the modules to adapt: by last name component, or every linear for all-linear."""
    names = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in NEVER_TARGETED or isinstance(module, Adapter) or not hasattr(module, "in_features"):
            continue
        if "all-linear" in targets or leaf in targets:
            names.append(name)
    wanted = set(targets) - {"all-linear"}
    found = {n.rsplit(".", 1)[-1] for n in names}
    if wanted - found:
        raise ValueError(f"LoRA target(s) {sorted(wanted - found)} match no linear layer of the model "
                         f"(linear layers are named e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                         f"down_proj)")
    return names


def apply_lora(model: nn.Module, cfg: LoRAConfig, name: str = DEFAULT) -> nn.Module:
    """Give the targeted linears adapter `name` (swapping plain linears for LoRALinear), in place.
    Returns the model."""
    for target in _targets(model, cfg.targets):
        parent_name, _, leaf = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, leaf)
        if isinstance(layer, LoRALinear):
            layer.add_adapter(name, cfg.r, cfg.alpha, cfg.dropout)
        else:
            layer = LoRALinear(layer, cfg.r, cfg.alpha, cfg.dropout, name)
            # A new layer starts with the same adapter active as the model's other layers.
            others = [m.active for _, m in lora_layers(model)]
            layer.active = others[0] if others else DEFAULT
            setattr(parent, leaf, layer)
    return model


def lora_layers(model: nn.Module, name: str | None = None):
    """(module name, LoRALinear) pairs; with `name`, only the layers that hold that adapter."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and (name is None or name in m.adapters)]


def adapter_parameters(model: nn.Module, name: str = DEFAULT) -> list[nn.Parameter]:
    return [p for _, m in lora_layers(model, name) for p in m.adapters[name].parameters()]


def mark_only_lora_trainable(model: nn.Module, also: tuple[str, ...] = (), adapter: str = DEFAULT) -> nn.Module:
    """requires_grad only on adapter `adapter`'s weights (and on parameters whose name starts with any
    of `also`)."""
    for name, p in model.named_parameters():
        p.requires_grad_(f"adapters.{adapter}.lora_" in name or any(name.startswith(a) for a in also))
    return model


def use_adapter(model: nn.Module, name: str | None):
    """Inside the block adapter `name` is the active one (None: none, the base model); the previous
    choice comes back on exit, also when the block raises."""
    return _switched(model, active=name)


@contextlib.contextmanager
def _switched(model: nn.Module, **values):
    """Set switch attributes (active, disabled) on every LoRA layer for the block, then restore them."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m.switch_state() for m in layers]
    for m in layers:
        for attr, value in values.items():
            setattr(m, attr, value)
    try:
        yield model
    finally:
        for m, state in zip(layers, saved):
            m.set_switch_state(state)


def lora_state_dict(model: nn.Module, name: str = DEFAULT) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if f"adapters.{name}.lora_" in k}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the default adapter into its base weight. Idempotent. An 8-bit base becomes a full-precision
    weight (W = dequantised W + scaling·B·A), ready for export."""
    for n, m in lora_layers(model):
        if len(m.adapters) > 1:
            raise ValueError(f"{n} holds adapters {list(m.adapters)}: only a single adapter can be merged")
        if m.merged or DEFAULT not in m.adapters:
            continue
        delta = m.adapters[DEFAULT].delta_weight()
        if m.weight.dtype == torch.int8:
            w = dequantize_int8(m.weight, m.weight_scale, delta.dtype)
            del m._buffers["weight"], m._buffers["weight_scale"]
            m.weight = nn.Parameter(w + delta, requires_grad=False)
            m.base_forward = None
        else:
            m.weight += delta.to(m.weight.dtype)
        m.merged = True
    return model


def disable_lora(model: nn.Module):
    """Inside the block the model is exactly its base (the PPO reference policy); adapters come back
    on exit, also when the block raises."""
    if any(m.merged for _, m in lora_layers(model)):
        raise ValueError("cannot disable LoRA on a model whose adapters are merged into the base weights")
    return _switched(model, disabled=True)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """merge_lora, then put the model's plain linear layers back: its keys are the base model's again."""
    merge_lora(model)
    for name, m in lora_layers(model):
        parent_name, _, leaf = name.rpartition(".")
        linear = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(m.weight.detach(), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
        setattr(model.get_submodule(parent_name), leaf, linear)
    return model
