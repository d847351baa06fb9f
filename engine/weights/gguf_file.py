"""GGUF files (llama.cpp's format) of the llama architecture, read through the `gguf` package, llama.cpp's
own reader and dequantiser (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the k-quants): the ModelConfig from the
metadata, and a lazy stream of (file, HF tensor name, getter) that load.py assigns like an HF folder's.

llama.cpp's converter reorders q/k rows from HF's split-half rotary layout to the interleaved one; the
getters undo it (foreign.permute_rotary, with the KV head count for k). A file without `output.weight`
ties the LM head to the embedding. Each getter reads its own bytes from the file and dequantises them to
float32, so a load holds one tensor beyond the model, never the whole file mapped.

Reference: llama.cpp's convert_hf_to_gguf.py (tensor names, the q/k permutation) and gguf-py.
"""
from __future__ import annotations


import re
from typing import NamedTuple

import numpy as np
import torch

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.weights.foreign import permute_rotary
from rlhf_engine.engine.weights.hf_folder import CheckpointError

MAGIC = b"GGUF"
SLAB_BYTES = 2**16  # stored bytes dequantised at a time: <= 0.5 MiB of float32 for a 4-bit type

_NAMES = {  # GGUF block tensor -> HF name inside model.layers.N
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


class TensorInfo(NamedTuple):
    name: str  # the GGUF name
    kind: object  # gguf.GGMLQuantizationType
    raw_shape: tuple[int, ...]  # the stored array's shape in bytes: rows, then bytes per row
    offset: int  # byte offset of its data in the file
    n_bytes: int


def is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def read_metadata(path: str) -> tuple[dict, list[TensorInfo]]:
    """({key: value} of the model's metadata, the tensors' places), with the file closed. The tokenizer's
    arrays (data/tokenizer.py reads them) are left out; tokenizer.ggml.tokens gives only its length."""
    import gguf  # llama.cpp's reader: imported here so that HF-only users never need it at start-up

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key == "tokenizer.ggml.tokens":
            metadata[key] = len(field.data)
        elif not key.startswith(("GGUF.", "tokenizer.")):
            try:
                metadata[key] = field.contents()
            except (ValueError, IndexError):  # a value type this gguf release cannot decode: not ours to need
                continue
    tensors = [TensorInfo(t.name, t.tensor_type, (*t.data.shape[:-1], t.data.shape[-1] * t.data.itemsize),
                          int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    del reader  # unmaps the file: getters read each tensor's bytes on their own
    return metadata, tensors


def gguf_config(path: str, metadata: dict, tensor_names: set[str]) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r}; only 'llama' is supported")

    def get(key, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    vocab = metadata.get("llama.vocab_size") or metadata.get("tokenizer.ggml.tokens") or None
    if vocab is None:
        raise CheckpointError(f"{path}: GGUF metadata gives no vocabulary size (llama.vocab_size or tokens)")
    try:
        return ModelConfig(
            dim=int(get("embedding_length")), n_layers=int(get("block_count")), n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)), vocab_size=int(vocab),
            hidden_dim=int(get("feed_forward_length")), norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(get("rope.freq_base", 10000.0)), max_seq_len=int(get("context_length")),
            tie_embeddings="output.weight" not in tensor_names)
    except ValueError as e:
        raise CheckpointError(f"{path}: GGUF metadata is not a LLaMA config: {e}") from None


def _f32(value) -> float:
    """GGUF stores floats as float32: 1e-5 reads 9.99999975e-06; take the shortest decimal that is that float32."""
    return float(str(np.float32(value)))


def hf_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    block = _BLOCK.fullmatch(name)
    if block and block.group(2) in _NAMES:
        return f"model.layers.{block.group(1)}.{_NAMES[block.group(2)]}"
    return None  # e.g. rope_freqs.weight: recomputed from rope_theta


def read_tensor(path: str, info: TensorInfo, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One tensor, dequantised by gguf-py into `dtype`, in torch's [out, in] layout. Big tensors go a slab of
    rows at a time, so the float32 copy of a whole embedding (113 MiB at SmolLM2's size) never exists beside
    a bf16 model."""
    from gguf import quants

    raw = np.fromfile(path, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
    if raw.size != info.n_bytes:
        raise CheckpointError(f"{path}: tensor {info.name} is cut short (truncated file?)")
    raw = raw.reshape(info.raw_shape)
    rows = raw.shape[0] if raw.ndim > 1 else 1
    slab = max(1, SLAB_BYTES // max(1, info.n_bytes // rows))
    out = None  # filled slab by slab: no list of parts to concatenate (which would hold the tensor twice)
    try:
        for start in range(0, rows, slab):
            values = quants.dequantize(raw[start:start + slab] if raw.ndim > 1 else raw, info.kind)
            part = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
            if raw.ndim == 1 or slab >= rows:
                return part.to(dtype)
            if out is None:
                out = torch.empty((rows, *part.shape[1:]), dtype=dtype)
            out[start:start + slab] = part
    except (NotImplementedError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: tensor {info.name} of type {getattr(info.kind, 'name', info.kind)} cannot be "
                              f"dequantised by gguf {_gguf_version()}: {e}") from None
    return out


def _gguf_version() -> str:
    from importlib import metadata
    return metadata.version("gguf")


def gguf_checkpoint(path: str, dtype: torch.dtype | None = None):
    """(ModelConfig, lazy stream of (file, HF tensor name, getter)) for a llama GGUF file; the getters
    dequantise into `dtype` (default float32)."""
    dtype = dtype or torch.float32
    metadata, tensors = read_metadata(path)
    cfg = gguf_config(path, metadata, {t.name for t in tensors})

    def entries():
        for info in tensors:
            name = hf_name(info.name)
            if name is None:
                continue
            if name.endswith("q_proj.weight"):
                get = (lambda info=info: permute_rotary(read_tensor(path, info, dtype), cfg.n_heads))
            elif name.endswith("k_proj.weight"):
                get = (lambda info=info: permute_rotary(read_tensor(path, info, dtype), cfg.n_kv_heads))
            else:
                get = (lambda info=info: read_tensor(path, info, dtype))
            yield path, name, get
    return cfg, entries()
