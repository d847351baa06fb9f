"""`train.py demo`: the whole pipeline on built-in data with a tiny model, on a CPU in minutes.

Stages that have landed run here in order, each saying what it did; later stages (SFT, reward model,
PPO) join as they land.
"""
from __future__ import annotations

import os
import time

import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import ModelConfig
from engine.generate import SamplingConfig, generate
from engine.model import LLaMA


def say(msg: str):
    print(f"[demo] {msg}", flush=True)


def run(out: str, seed: int = 0) -> int:
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(seed)
    model = LLaMA(cfg).init_weights().eval()
    say(f"built a random '{'tiny'}' LLaMA: {cfg.num_params():,} parameters "
        f"(dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads)")

    ckpt = save_checkpoint(model, os.path.join(out, "init"))
    reloaded = load_checkpoint(ckpt).eval()
    tokens = torch.randint(3, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        diff = (model(tokens) - reloaded(tokens)).abs().max().item()
    say(f"saved and reloaded it as a Hugging Face LLaMA folder {ckpt} (max logit difference {diff:.1e})")
    if diff > 1e-6:
        raise RuntimeError("reloaded checkpoint disagrees with the saved model")

    prompts = [[1, 17, 42, 99], [1, 5]]
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=seed)
    gen = generate(reloaded, prompts, sampling, eos_id=2, pad_id=0)
    lengths = gen.response_mask.sum(1).tolist()
    say(f"sampled {sum(lengths)} tokens from 2 ragged prompts with the KV cache (response lengths {lengths})")
    say(f"done in {time.time() - t0:.1f}s; SFT, reward model and PPO join this demo as they land")
    return 0
