"""What a stage starts from: its tokenizer; the network a training stage trains, built from a base
checkpoint (or a preset, randomly initialised) with an optional 8-bit frozen base, optional LoRA
adapters, the storage precision (engine/model/precision.py) and activation checkpointing; and the one
loader of a trained network to sample or score with, a checkpoint plus an optional adapter (`load_model`:
eval, check, generate, and the reward models of PPO, eval and check).

Precision: with LoRA the frozen base is stored in the compute dtype (bf16 halves its memory) and the
adapters stay float32; full fine-tuning keeps float32 master weights.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from rlhf_engine.data.tokenizer import Tokenizer, find_tokenizer
from rlhf_engine.engine.weights.adapters import (is_adapter_folder, load_adapter_weights, read_adapter_base,
                                                 read_adapter_config)
from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.engine.model.config import PRESETS, ModelConfig
from rlhf_engine.engine.model.int8 import quantize_on_load
from rlhf_engine.engine.model.lora import LoRAConfig, adapter_parameters, apply_lora, mark_only_lora_trainable
from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.engine.model.precision import torch_dtype


def check_model_name(model: str) -> None:
    """A --model that is neither a path nor a preset is a typo: say what exists instead of "no checkpoint"."""
    if model not in PRESETS and not os.path.exists(model):
        raise FileNotFoundError(f"--model {model} is not a checkpoint folder or file, nor a preset; presets: "
                                f"{', '.join(PRESETS)}")


def resolve_tokenizer(model: str, tokenizer: str | None) -> Tokenizer:
    """--tokenizer if given, else the one that travels with the checkpoint (data.tokenizer.find_tokenizer)."""
    check_model_name(model)
    if tokenizer:
        return Tokenizer(tokenizer)
    found = None if model in PRESETS else find_tokenizer(model)
    if found is None:
        raise FileNotFoundError(f"no tokenizer for --model {model} (no tokenizer.model or tokenizer.json beside it, "
                                "and not a GGUF file): pass --tokenizer FILE")
    return Tokenizer(found)


def build_model(model: str, tokenizer: Tokenizer, *, head: str = "lm", dtype: str = "fp32",
                lora: LoRAConfig | None = None, load_in_8bit: bool = False, grad_checkpointing: bool = False,
                device: torch.device = torch.device("cpu"), seed: int = 0) -> LLaMA:
    """A preset name gives a random init whose vocabulary is the tokenizer's; a path loads weights."""
    compute = torch_dtype(dtype)
    if model in PRESETS:
        if lora is not None:
            raise ValueError(f"--model {model} is a randomly initialised preset: LoRA on a random base learns "
                             "little; train it fully with --no-lora, or start from a checkpoint")
        if load_in_8bit:
            raise ValueError("--load-in-8bit needs a checkpoint to quantise, not a random preset")
        cfg = ModelConfig.preset(model, vocab_size=tokenizer.vocab_size)
        net = LLaMA(cfg, head=head).init_weights(generator=torch.Generator().manual_seed(seed)).to(device)
    else:
        transform = quantize_on_load if load_in_8bit else None
        # Frozen bases live in the compute dtype; trained weights are float32 masters.
        net = load_checkpoint(model, head=head, device=device, transform=transform,
                              dtype=compute if lora is not None else torch.float32)
        tokenizer.check_model_vocab(net.cfg.vocab_size, model)
    if lora is not None:
        apply_lora(net, lora)
        for name, p in net.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.data = p.data.float()
        # A reward model's scalar head is new: it trains along with the adapters.
        mark_only_lora_trainable(net, also=("score.",) if head == "score" else ())
        if head == "score":
            net.score.weight.data = net.score.weight.data.float()
    net.model.grad_checkpointing = grad_checkpointing
    return net


def load_model(path: str, tok: Tokenizer, *, adapter: str | None = None, head: str = "lm", dtype: str = "fp32",
               device: torch.device | str = "cpu", load_in_8bit: bool = False,
               base_fallback: str | None = None) -> LLaMA:
    """A checkpoint (any format weights/load.py reads) plus an optional LoRA adapter, frozen, in eval mode,
    held as PPO holds its policy: the base stored in the compute dtype (or 8-bit), the adapter in float32
    beside it, unmerged, so that what eval and check sample is what PPO sampled. `path` may itself be an
    adapter folder: it then goes on the base its adapter_config.json names (or on `base_fallback` when that
    base is not here). An adapter's extra tensors (a reward model's score head) load into `head`."""
    if adapter is None and is_adapter_folder(path):
        path, adapter = read_adapter_base(path), path
        if not (path and os.path.exists(path)):
            if base_fallback is None:
                raise ValueError(f"{adapter}: the adapter's base {path!r} (adapter_config.json) is not here")
            path = base_fallback
    net = load_checkpoint(path, head=head, dtype=torch_dtype(dtype), device=device,
                          transform=quantize_on_load if load_in_8bit else None)
    tok.check_model_vocab(net.cfg.vocab_size, path)
    if adapter is not None:
        apply_lora(net, dataclasses.replace(read_adapter_config(adapter), dropout=0.0))
        for p in adapter_parameters(net):
            p.data = p.data.float()
        load_adapter_weights(net, adapter)
    return net.eval().requires_grad_(False)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
