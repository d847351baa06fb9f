"""`train.py generate`: load a checkpoint (and optionally a LoRA adapter), sample a continuation of each
prompt with engine/model/generate.py, and print one decoded response per line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from rlhf_engine.engine.weights.builder import load_model, resolve_tokenizer
from rlhf_engine.engine.model.generate import SamplingConfig, generate
from rlhf_engine.engine.model.precision import DTYPES


@dataclass(frozen=True)
class GenerateConfig:
    model: str = field(default=None, metadata={"help": "checkpoint: HF folder, Meta folder (params.json + "
                                                       "consolidated.*.pth) or llama2.c .bin"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder (ours or PEFT's) to apply"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model or tokenizer.json (default: "
                                                                  "the one beside the checkpoint, or a GGUF's own)"})
    prompt: tuple[str, ...] = field(default=("",), metadata={"help": "one or more prompts, answered as a batch"})
    dtype: str = field(default="fp32", metadata={"help": "compute dtype", "choices": sorted(DTYPES)})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    sampling: SamplingConfig = field(default=SamplingConfig(), metadata={"prefix": ""})


def run(cfg: GenerateConfig) -> int:
    if not os.path.exists(cfg.model):
        raise FileNotFoundError(f"no checkpoint at {cfg.model}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    model = load_model(cfg.model, tok, adapter=cfg.adapter, dtype=cfg.dtype, device=device)
    out = generate(model, [tok.encode(p, bos=True) for p in cfg.prompt], cfg.sampling, tok.eos_id, tok.pad_id)
    for i in range(len(cfg.prompt)):
        ids = out.response_tokens[i][out.response_mask[i].bool()].tolist()
        if ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        print(tok.decode(ids), flush=True)
    return 0
