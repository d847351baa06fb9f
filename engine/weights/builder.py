"""What a training stage starts from: its tokenizer, and the network it trains, built from a base
checkpoint (or a preset, randomly initialised) with an optional 8-bit frozen base, optional LoRA
adapters, the storage precision (engine/model/precision.py) and activation checkpointing.

Precision: with LoRA the frozen base is stored in the compute dtype (bf16 halves its memory) and the
adapters stay float32; full fine-tuning keeps float32 master weights.
"""
from __future__ import annotations

import os

import torch

from rlhf_engine.data.tokenizer import Tokenizer, find_tokenizer
from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.engine.model.config import PRESETS, ModelConfig
from rlhf_engine.engine.model.int8 import quantize_on_load
from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora, mark_only_lora_trainable
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
        cfg = ModelConfig(**{**ModelConfig.preset(model).to_dict(), "vocab_size": tokenizer.vocab_size})
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


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
