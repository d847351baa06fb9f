"""Load any supported checkpoint into an LLaMA: this file picks the format, the format's module reads the
tensors (HF folders: hf_folder.py; GGUF files: gguf_file.py; Meta's and llama2.c's: foreign.py), and the model
is built on the meta device and filled tensor by tensor, so a checkpoint never exists twice in memory.

References: gpt-fast (meta-device loading with assign=True).
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable

import torch

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.engine.weights.foreign import llama2c_checkpoint, meta_checkpoint
from rlhf_engine.engine.weights.gguf_file import gguf_checkpoint, is_gguf
from rlhf_engine.engine.weights.hf_folder import CONFIG, CheckpointError, hf_tensors


def detect_format(path: str) -> str:
    """'hf', 'meta', 'gguf' or 'llama2c', from what is at `path`."""
    if os.path.isfile(path):
        return "gguf" if is_gguf(path) else "llama2c"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.exists(os.path.join(path, CONFIG)):
        return "hf"
    if os.path.exists(os.path.join(path, "params.json")):
        return "meta"
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json, and no params.json for Meta's format)")


def load_checkpoint(path: str, head: str = "lm", dtype: torch.dtype | None = None, device="cpu",
                    transform: Callable | None = None) -> LLaMA:
    """Load any supported checkpoint into an LLaMA with `head` ('lm' or 'score').

    dtype: convert floating tensors (default: keep the file's). transform(model) is applied on the
    meta device before any tensor is read (e.g. swapping linears for 8-bit ones that quantise on
    assignment). Loading a causal LM with head='score' starts a fresh scalar head (e.g. a reward
    model initialised from the SFT model); the reverse is an error.
    """
    fmt = detect_format(path)
    if fmt == "hf":
        cfg = ModelConfig.from_hf(os.path.join(path, CONFIG))
        tensors = hf_tensors(path)
    else:
        cfg, tensors = (gguf_checkpoint(path, dtype) if fmt == "gguf"  # dequantised straight into dtype
                        else meta_checkpoint(path) if fmt == "meta" else llama2c_checkpoint(path))
    with torch.device("meta"):
        model = LLaMA(cfg, head=head)
    if transform is not None:
        transform(model)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for source, name, get in tensors:
        if name.endswith("rotary_emb.inv_freq"):  # saved by transformers < 4.31; recomputed here
            continue
        if name not in expected:
            if head == "score" and name == "lm_head.weight":
                continue
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (not part of a LLaMA with {head} head)")
        t = get()
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {list(t.shape)} but the config implies "
                                  f"{list(want.shape)}")
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype or t.dtype)
        model.load_state_dict({name: t}, strict=False, assign=True)
        del t
        give_back_freed_memory()  # this tensor's transients, before the next one's
    # Still on the meta device = never assigned (an 8-bit layer's weight_scale is filled with its weight).
    missing = sorted(k for k, v in model.state_dict().items() if v.is_meta and k in expected)
    if missing == ["score.weight"] and head == "score":
        model.score.weight = torch.nn.Parameter(
            torch.randn(1, cfg.dim, device=device, dtype=dtype or model.model.norm.weight.dtype) / cfg.dim**0.5)
    elif missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}")
    if cfg.tie_embeddings and head == "lm":
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def give_back_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; nothing elsewhere). glibc raises its mmap
    threshold to the size of each large block freed, so each tensor's transients (a GGUF dequantisation's
    float32 buffers, an 8-bit quantisation's) land on the heap and stay there once freed: a SmolLM2 8-bit
    load peaked at 3.5x its model (553 MiB for 156) instead of 1.2x."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """glibc, if this process runs on it (musl and macOS have no malloc_trim)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None
