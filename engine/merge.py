"""`train.py merge`: fold LoRA adapters into their base and write a full checkpoint.

StackLLaMA merges after SFT (the merged model is the base of the reward model and of PPO) and after
reward modelling. A reward-model adapter (PEFT task SEQ_CLS) carries its score head whole in
modules_to_save; the merged checkpoint keeps it (StackLLaMA's published RM adapter once lost it), and
loads in transformers as LlamaForSequenceClassification.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from rlhf_engine.data.tokenizer import find_tokenizer
from rlhf_engine.engine.weights.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from rlhf_engine.engine.weights.hf_folder import save_model_folder
from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.engine.model.lora import merge_and_unload
from rlhf_engine.engine.model.precision import DTYPES


def merge(base: str, adapter: str, out: str, dtype: str = "fp32", tokenizer: str | None = None) -> str:
    config = os.path.join(adapter, ADAPTER_CONFIG)
    if not os.path.exists(config):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {adapter}: not a LoRA adapter folder")
    with open(config) as f:
        task = json.load(f).get("task_type", "CAUSAL_LM")
    head = "score" if task == "SEQ_CLS" else "lm"
    # Merge in float32 whatever the final dtype: W + (α/r)·B·A in bf16 would round the update away.
    model = load_checkpoint(base, head=head, dtype=torch.float32)
    load_adapter(model, adapter)
    if head == "score" and not _has_score(adapter):
        raise ValueError(f"{adapter}: a SEQ_CLS adapter without its score head (modules_to_save); the merged "
                         "reward model would have a random head")
    merge_and_unload(model).to(DTYPES[dtype])
    tok = tokenizer or find_tokenizer(adapter) or find_tokenizer(base)
    save_model_folder(model, out, tokenizer=tok, pad_token_id=0 if head == "score" else None)
    return out


def _has_score(adapter: str) -> bool:
    with safe_open(os.path.join(adapter, ADAPTER_WEIGHTS), framework="pt") as f:
        return any(k.endswith("score.weight") for k in f.keys())


@dataclass(frozen=True)
class MergeConfig:
    base: str = field(default=None, metadata={"help": "the checkpoint the adapter was trained on"})
    adapter: str = field(default=None, metadata={"help": "adapter folder (ours or PEFT's), e.g. "
                                                         "OUT/checkpoint-001000"})
    out: str = field(default=None, metadata={"help": "where to write the merged checkpoint"})
    dtype: str = field(default="fp32", metadata={"help": "dtype of the written weights", "choices": sorted(DTYPES)})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model to copy (default: the "
                                                                  "adapter's, else the base's)"})


def run(cfg: MergeConfig) -> int:
    """`train.py merge`."""
    out = merge(cfg.base, cfg.adapter, cfg.out, cfg.dtype, cfg.tokenizer)
    print(f"merged {cfg.adapter} into {cfg.base}: wrote {out}")
    return 0
