"""Model folders in the Hugging Face LLaMA layout: written here, their tensors read here (engine/weights/load.py
picks the format and builds the model; Meta's and llama2.c's formats come through engine/weights/foreign.py).

Layout written and read: config.json + model.safetensors (or model-0000i-of-0000n.safetensors with
model.safetensors.index.json) + tokenizer.model, tensor names exactly as transformers names them.
Loading builds the model on the meta device and assigns tensors read from memory-mapped safetensors,
so a 7B checkpoint never exists twice in memory. Pickles are never unpickled: Meta's .pth files and
old pytorch_model.bin shards go through torch.load(weights_only=True).

Writes are atomic (engine/weights/atomic.py): a folder with the final name is always complete.

References: gpt-fast (meta-device loading with assign=True); transformers' LLaMA tensor names.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rlhf_engine.data.tokenizer import Tokenizer
from rlhf_engine.engine.weights.atomic import atomic_dir, write_json
from rlhf_engine.engine.model.llama import LLaMA

CONFIG, SAFETENSORS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the tensor."""


# ---- writing -------------------------------------------------------------------------------------

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


def write_model_files(model: LLaMA, folder: str, tokenizer: Tokenizer | str | None = None,
                      max_shard_bytes: int = 5 * 2**30,
                pad_token_id: int | None = None) -> None:
    """Write `model`'s HF files into an existing folder (no atomicity: see save_model_folder)."""
    state = export_state_dict(model)
    if any(t.dtype == torch.int8 for t in state.values()):
        raise ValueError("the model holds 8-bit weights; merge or dequantise before exporting a full checkpoint")
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    save_tensors(state, folder, max_shard_bytes)
    write_json(os.path.join(folder, CONFIG), hf_config(model, dtype, pad_token_id))
    if tokenizer is not None:  # a Tokenizer, or the path of one: it travels with the weights
        (tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)).save(folder)


def save_model_folder(model: LLaMA, out_dir: str, tokenizer: Tokenizer | str | None = None,
                    max_shard_bytes: int = 5 * 2**30, pad_token_id: int | None = None) -> str:
    """Write `model` as an HF LLaMA folder at out_dir, atomically. Returns out_dir."""
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, tokenizer, max_shard_bytes, pad_token_id)
    return out_dir


# ---- reading: Hugging Face folders ---------------------------------------------------------------

def hf_tensors(folder: str):
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
                names = list(f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{fpath}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        for name in names:
            yield fpath, name, (lambda name=name: _read(fpath, name))


def _read(fpath, name):
    """One tensor through its own mapping of the file: the pages of a mapped file count as this process's
    memory until it is unmapped, so one mapping held over the whole load would add the entire file (in
    its stored dtype) to the peak, on top of the model it is converted into."""
    try:
        with safe_open(fpath, framework="pt", device="cpu") as f:
            return f.get_tensor(name)
    except SafetensorError as e:
        raise CheckpointError(f"{fpath}: cannot read tensor {name} (truncated or corrupt?): {e}") from None


def torch_load_weights(path: str, mmap: bool = True) -> dict:
    """A torch file's tensors and plain Python values, read by torch's restricted unpickler: a file that
    holds any other object is refused, naming the file, and never unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (such as {found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds objects that are not plain tensors{what}; it will not be loaded, "
                              "since unpickling an object can run arbitrary code") from None
    except Exception as e:  # torch's own message may be several lines, and may advise unsafe loading
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in first_line:
            first_line = "not a torch file of plain tensors"
        raise CheckpointError(f"{path}: cannot read as a torch file: {first_line}") from None


def _pickle_tensors(files):
    for path in files:
        state = torch_load_weights(path)
        for name, t in state.items():
            yield path, name, (lambda t=t: t)
