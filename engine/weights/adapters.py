"""Adapters on disk in PEFT's layout: adapter_model.safetensors + adapter_config.json, keyed
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`, so an adapter written here loads in PEFT and
one written by PEFT loads here. Tensors saved whole beside an adapter (PEFT's `modules_to_save`, e.g. a
reward model's `score.weight`) travel with it. The layer itself is engine/model/lora.py.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhf_engine.engine.weights.atomic import atomic_dir, write_json
from rlhf_engine.engine.model.lora import DEFAULT, LoRAConfig, LoRALinear, apply_lora, lora_layers

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: str, base_model: str | None = None,
                 task_type: str = "CAUSAL_LM", modules_to_save: dict[str, torch.Tensor] | None = None) -> str:
    """Write adapters as PEFT does, atomically (see write_adapter). Returns out_dir."""
    with atomic_dir(out_dir) as tmp:
        write_adapter(model, cfg, tmp, base_model, task_type, modules_to_save)
    return out_dir


def write_adapter(model: nn.Module, cfg: LoRAConfig, folder: str, base_model: str | None = None,
                  task_type: str = "CAUSAL_LM", modules_to_save: dict[str, torch.Tensor] | None = None,
                  name: str = DEFAULT) -> None:
    """Adapter `name`'s files into an existing folder, keyed as PEFT does: base_model.model.<module>.lora_A.weight
    / lora_B.weight. modules_to_save: extra full tensors (e.g. a reward model's `score.weight`) beside them."""
    tensors = {}
    for module, m in lora_layers(model, name):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = m.adapters[name].lora_a.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = m.adapters[name].lora_b.detach().contiguous().cpu()
    for key, t in (modules_to_save or {}).items():
        tensors[PEFT_PREFIX + key] = t.detach().contiguous().cpu()
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model, name)})
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in modules_to_save}) if modules_to_save else None,
        "base_model_name_or_path": base_model, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(os.path.join(folder, ADAPTER_CONFIG), config)


def read_adapter_config(adapter_dir: str) -> LoRAConfig:
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter_dir}")
    with open(path) as f:
        try:
            c = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {c['peft_type']!r} is not LORA")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "layers_to_transform", "rank_pattern",
                               "alpha_pattern") if c.get(k)]
    if c.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{path}: LoRA options {unsupported} are not supported")
    targets = c.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if len(targets) == 1 and targets[0] not in ("all-linear",) and not targets[0].isidentifier():
        raise ValueError(f"{path}: regex target_modules {targets[0]!r} are not supported; list the layer names")
    return LoRAConfig(r=c["r"], alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                      targets=targets)


def read_adapter_base(adapter_dir: str) -> str | None:
    """The base model an adapter was trained on, as its adapter_config.json records it."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        return json.load(f).get("base_model_name_or_path")


def load_adapter(model: nn.Module, adapter_dir: str, name: str = DEFAULT,
                 extras: str = "load") -> tuple[nn.Module, LoRAConfig]:
    """Give `model` adapter `name` from `adapter_dir` (ours or PEFT's) and load its weights."""
    cfg = read_adapter_config(adapter_dir)
    apply_lora(model, cfg, name)
    load_adapter_weights(model, adapter_dir, name, extras)
    return model, cfg


def load_adapter_weights(model: nn.Module, adapter_dir: str, name: str = DEFAULT,
                         extras: str = "load") -> dict[str, torch.Tensor]:
    """Load adapter `name`'s weights into a model whose layers already hold it.

    Full tensors saved beside the adapter (PEFT's modules_to_save, e.g. a reward model's
    `score.weight`) are loaded into the model's parameter of that name (extras="load") or returned
    untouched (extras="return": e.g. a reward head kept apart from a policy's lm head). Returns those
    left untouched.
    """
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    try:
        tensors = load_file(path)
    except (FileNotFoundError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot read adapter weights: {e}") from None
    modules = dict(model.named_modules())
    state, returned = {}, {}
    for key, t in tensors.items():
        key_name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".").replace(".modules_to_save", "")
        module_name, current = None, None
        for peft, leaf in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b")):
            if key_name.endswith(peft):
                module_name = key_name[: -len(peft)]
                layer = modules.get(module_name)
                if isinstance(layer, LoRALinear) and name in layer.adapters:
                    current = getattr(layer.adapters[name], leaf)
                break
        else:
            if extras == "return":
                returned[key_name] = t
                continue
            module_name, _, leaf = key_name.rpartition(".")
            current = getattr(modules.get(module_name), leaf, None) if module_name in modules else None
        if current is None:
            raise ValueError(f"{path}: tensor {key} matches no parameter of the model")
        if tuple(current.shape) != tuple(t.shape):
            raise ValueError(f"{path}: tensor {key} has shape {list(t.shape)}, the model expects "
                             f"{list(current.shape)}")
        state[key] = (current, t)
    loaded = {id(current) for current, _ in state.values()}
    missing = [n for n, m in lora_layers(model, name) if id(m.adapters[name].lora_a) not in loaded]
    if missing:
        raise ValueError(f"{path}: no adapter weights for {missing[0]} (and {len(missing) - 1} more)")
    with torch.no_grad():
        for current, t in state.values():
            current.copy_(t.to(current.dtype))
    return returned


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ADAPTER_CONFIG))
