"""Checkpoint folders in the Hugging Face LLaMA layout, plus importers for Meta's and llama2.c's formats.

Layout written and read: config.json + model.safetensors (or model-0000i-of-0000n.safetensors with
model.safetensors.index.json) + tokenizer.model, tensor names exactly as transformers names them.
Loading builds the model on the meta device and assigns tensors read from memory-mapped safetensors,
so a 7B checkpoint never exists twice in memory. Pickles are never unpickled: Meta's .pth files and
old pytorch_model.bin shards go through torch.load(weights_only=True).

Writes are atomic: everything goes to a hidden temp folder beside the target, is fsynced, and is
renamed into place last, so a folder with the final name is always complete.

References: transformers' convert_llama_weights_to_hf.py (rotary permutation, Meta shard layout),
llama2.c export.py (legacy .bin layout), gpt-fast (meta-device loading with assign=True).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.config import ModelConfig
from engine.model import LLaMA

CONFIG, SAFETENSORS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the tensor."""


# ---- writing -------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
    """Yield a temp folder; on success it replaces `out_dir` by rename, on failure it is removed."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        for f in os.listdir(tmp):
            _fsync(os.path.join(tmp, f))
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        os.rename(tmp, out_dir)
        _fsync(parent)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_tensors(state: dict[str, torch.Tensor], folder: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `state` as model.safetensors, or as shards plus the index transformers reads."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFETENSORS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(os.path.join(folder, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})


def export_state_dict(model: LLaMA) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names; a tied lm_head is stored once (as HF does)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_config(model: LLaMA, dtype: torch.dtype, pad_token_id: int | None = None) -> dict:
    cfg = model.cfg.to_hf(str(dtype).removeprefix("torch."))
    if model.head == "score":  # a reward model: transformers' LlamaForSequenceClassification, one label
        cfg.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                   id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        cfg["pad_token_id"] = pad_token_id
    return cfg


def write_model(model: LLaMA, folder: str, tokenizer_path: str | None = None, max_shard_bytes: int = 5 * 2**30,
                pad_token_id: int | None = None) -> None:
    """Write `model`'s HF files into an existing folder (no atomicity: see save_checkpoint)."""
    state = export_state_dict(model)
    if any(t.dtype == torch.int8 for t in state.values()):
        raise ValueError("the model holds 8-bit weights; merge or dequantise before exporting a full checkpoint")
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    save_tensors(state, folder, max_shard_bytes)
    write_json(os.path.join(folder, CONFIG), hf_config(model, dtype, pad_token_id))
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(folder, TOKENIZER))


def save_checkpoint(model: LLaMA, out_dir: str, tokenizer_path: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, pad_token_id: int | None = None) -> str:
    """Write `model` as an HF LLaMA folder at out_dir, atomically. Returns out_dir."""
    with atomic_dir(out_dir) as tmp:
        write_model(model, tmp, tokenizer_path, max_shard_bytes, pad_token_id)
    return out_dir


# ---- reading: Hugging Face folders ---------------------------------------------------------------

def detect_format(path: str) -> str:
    """'hf', 'meta' or 'llama2c', from what is at `path`."""
    if os.path.isfile(path):
        return "llama2c"
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
        tensors = _hf_tensors(path)
    elif fmt == "meta":
        cfg, tensors = _meta_checkpoint(path)
    else:
        cfg, tensors = _llama2c_checkpoint(path)
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


def _hf_tensors(folder: str):
    """(source file, name, getter) for every tensor of an HF folder, read lazily."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            try:
                files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
    elif os.path.exists(os.path.join(folder, SAFETENSORS)):
        files = [SAFETENSORS]
    else:
        bins = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
        if not bins:
            raise CheckpointError(f"{folder}: no model.safetensors, safetensors index or pytorch_model*.bin")
        yield from _pickle_tensors(bins)
        return
    for fname in files:
        fpath = os.path.join(folder, fname)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{fpath}: listed in the index but missing")
        try:
            with safe_open(fpath, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield fpath, name, (lambda f=f, name=name: _read(f, fpath, name))
        except SafetensorError as e:
            raise CheckpointError(f"{fpath}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def _read(f, fpath, name):
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{fpath}: cannot read tensor {name} (truncated or corrupt?): {e}") from None


def _torch_load(path: str) -> dict:
    try:  # weights_only: the restricted unpickler that refuses arbitrary objects
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load as a weights-only torch file: {e}") from None


def _pickle_tensors(files):
    for path in files:
        state = _torch_load(path)
        for name, t in state.items():
            yield path, name, (lambda t=t: t)


# ---- reading: Meta's consolidated.*.pth ----------------------------------------------------------

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


def _meta_checkpoint(folder: str):
    params_path = os.path.join(folder, "params.json")
    with open(params_path) as f:
        params = json.load(f)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{params_path} is missing required key {key!r}")
    files = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not files:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth files")
    shards = [_torch_load(p) for p in files]
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

def _llama2c_checkpoint(path: str):
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
