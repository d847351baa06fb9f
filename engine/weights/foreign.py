"""Importers for the two non-HF LLaMA formats: Meta's consolidated.*.pth folders and llama2.c's legacy
.bin. Each returns (ModelConfig, a lazy stream of (source file, HF tensor name, getter)) that
engine/weights/hf_folder.py's loader assigns like an HF folder's tensors; both reorder q/k rows from the
interleaved rotary layout to HF's split-half one.

References: transformers' convert_llama_weights_to_hf.py (rotary permutation, Meta shard layout),
llama2.c export.py (legacy .bin layout).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from rlhf_engine.engine.weights.hf_folder import CheckpointError, torch_load_weights
from rlhf_engine.engine.model.config import ModelConfig


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved rotary pairs (2i, 2i+1) to the split-half layout
    (i, i + d/2), per head. Since q and k are permuted alike, attention scores are unchanged."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


_META_NAMES = {  # Meta name -> (HF name, dim along which model-parallel shards are split or None)
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_checkpoint(folder: str):
    params_path = os.path.join(folder, "params.json")
    with open(params_path) as f:
        params = json.load(f)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{params_path} is missing required key {key!r}")
    files = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not files:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth files")
    shards = [torch_load_weights(p) for p in files]
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    vocab = params.get("vocab_size", -1)
    if vocab <= 0:  # LLaMA-1's params.json says -1: the tokenizer decides; read it off the embedding
        vocab = shards[0]["tok_embeddings.weight"].shape[0]
    try:
        cfg = ModelConfig(dim=dim, n_layers=params["n_layers"], n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                          hidden_dim=meta_hidden_dim(dim, params.get("multiple_of", 256),
                                                     params.get("ffn_dim_multiplier")),
                          norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
                          max_seq_len=params.get("max_seq_len", 2048))
    except ValueError as e:
        raise CheckpointError(f"{params_path}: {e}") from None

    def merged(name, cat_dim):
        parts = [s[name] for s in shards]
        return parts[0] if len(parts) == 1 or cat_dim is None else torch.cat(parts, dim=cat_dim)

    def entries():
        src = files[0] if len(files) == 1 else folder
        # Embedding shards split the model dimension; the output layer splits the vocabulary.
        yield src, "model.embed_tokens.weight", lambda: merged("tok_embeddings.weight", 1)
        yield src, "model.norm.weight", lambda: merged("norm.weight", None)
        yield src, "lm_head.weight", lambda: merged("output.weight", 0)
        for i in range(cfg.n_layers):
            for meta_name, (hf_name, cat_dim) in _META_NAMES.items():
                key = f"layers.{i}.{meta_name}"
                if key not in shards[0]:
                    raise CheckpointError(f"{files[0]}: missing tensor {key}")
                get = (lambda key=key, cat_dim=cat_dim: merged(key, cat_dim))
                if hf_name.startswith("self_attn.q_proj"):
                    get = (lambda g=get: permute_rotary(g(), cfg.n_heads))
                elif hf_name.startswith("self_attn.k_proj"):
                    get = (lambda g=get: permute_rotary(g(), cfg.n_kv_heads))
                yield src, f"model.layers.{i}.{hf_name}", get

    return cfg, entries()


# ---- reading: llama2.c legacy .bin ---------------------------------------------------------------

def llama2c_checkpoint(path: str):
    """llama2.c's legacy export: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; vocab_size < 0 means an untied classifier follows), then fp32 weights grouped by kind
    across layers, in llama2.c's interleaved rotary layout."""
    size = os.path.getsize(path)
    if size < 28:
        raise CheckpointError(f"{path}: too small for a llama2.c checkpoint ({size} bytes)")
    header = np.fromfile(path, dtype=np.int32, count=7)
    if int(np.frombuffer(header[:1].tobytes(), dtype=np.uint32)[0]) == 0x616B3432:
        raise CheckpointError(f"{path}: llama2.c version-1/2 export ('ak42' magic); only the legacy "
                              "(version 0) export is supported — re-export with --version 0")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = (int(x) for x in header)
    shared = vocab > 0
    vocab = abs(vocab)
    try:
        cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                          hidden_dim=hidden, norm_eps=1e-5, max_seq_len=seq_len, tie_embeddings=shared)
    except ValueError as e:
        raise CheckpointError(f"{path}: header is not a llama2.c config: {e}") from None
    hd, kv_dim = cfg.head_dim, n_kv * cfg.head_dim
    layout = [  # (name pattern or None for skipped, per-layer shape, repeated per layer?)
        ("model.embed_tokens.weight", (vocab, dim), False),
        ("model.layers.{}.input_layernorm.weight", (dim,), True),
        ("model.layers.{}.self_attn.q_proj.weight", (dim, dim), True),
        ("model.layers.{}.self_attn.k_proj.weight", (kv_dim, dim), True),
        ("model.layers.{}.self_attn.v_proj.weight", (kv_dim, dim), True),
        ("model.layers.{}.self_attn.o_proj.weight", (dim, dim), True),
        ("model.layers.{}.post_attention_layernorm.weight", (dim,), True),
        ("model.layers.{}.mlp.gate_proj.weight", (hidden, dim), True),
        ("model.layers.{}.mlp.down_proj.weight", (dim, hidden), True),
        ("model.layers.{}.mlp.up_proj.weight", (hidden, dim), True),
        ("model.norm.weight", (dim,), False),
        (None, (seq_len, hd // 2), False),  # freq_cis_real: recomputed from positions
        (None, (seq_len, hd // 2), False),  # freq_cis_imag
    ] + ([] if shared else [("lm_head.weight", (vocab, dim), False)])
    n_floats = sum(int(np.prod(s)) * (n_layers if per_layer else 1) for _, s, per_layer in layout)
    if size != 28 + 4 * n_floats:
        raise CheckpointError(f"{path}: {size} bytes, but a llama2.c legacy export with this header has "
                              f"{28 + 4 * n_floats} (truncated, or not a llama2.c .bin?)")
    data = np.memmap(path, dtype=np.float32, mode="r", offset=28)

    def entries():
        offset = 0
        for pattern, shape, per_layer in layout:
            n = int(np.prod(shape))
            for layer in range(n_layers if per_layer else 1):
                start = offset
                offset += n
                if pattern is None:
                    continue
                name = pattern.format(layer)

                def get(start=start, name=name, shape=shape):
                    t = torch.from_numpy(np.array(data[start:start + int(np.prod(shape))])).view(shape)
                    if "q_proj" in name:
                        t = permute_rotary(t, n_heads)
                    elif "k_proj" in name:
                        t = permute_rotary(t, n_kv)
                    return t
                yield path, name, get

    return cfg, entries()
