"""Training checkpoints: model files plus a separate trainer state, written atomically, found for resume.

A checkpoint is `OUT/checkpoint-000123/`: the model part (HF folder and/or PEFT adapter files) and
`trainer_state.pt` (optimizer, step, loader cursors, every rank's RNG states, stage extras). The whole
folder is built under a hidden temp name and renamed into place, so `--resume auto` can trust any
`checkpoint-*` folder it sees: a save killed midway (even by SIGKILL) leaves only a hidden temp folder.

The trainer state holds only tensors and plain Python values, and is read back with
torch.load(weights_only=True): resuming never unpickles arbitrary objects.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch

from engine.adapter_files import load_adapter_weights, write_adapter
from engine.atomic import atomic_dir
from engine.checkpoint import TOKENIZER, load_checkpoint, write_model_files
from engine.dist import Dist, all_gather_objects, barrier, broadcast_object

TRAINER_STATE = "trainer_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator (the same seed on every rank, so replicas start equal), and switch torch's
    deterministic algorithms on or off as this run asks (the switch is process-wide, so every run sets it)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility; read at CUDA init
    torch.use_deterministic_algorithms(deterministic)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"checkpoint-{step:06d}")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _CKPT.match(name)
        path = os.path.join(out_dir, name)
        if m and os.path.exists(os.path.join(path, TRAINER_STATE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_training_checkpoint(dist: Dist, out_dir: str, step: int, write_model: Callable[[str], None],
                             state: dict, keep: int | None = None) -> str:
    """Collective: every rank contributes its RNG state; rank 0 writes. Returns the folder."""
    rngs = all_gather_objects(dist, rng_state())
    path = checkpoint_path(out_dir, step)
    if dist.is_main:
        with atomic_dir(path) as tmp:
            write_model(tmp)
            torch.save({**state, "step": step, "world_size": dist.world_size, "rng": rngs},
                       os.path.join(tmp, TRAINER_STATE))
        if keep:
            for _, old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
    return path


def resolve_resume(dist: Dist, resume: str | None, out_dir: str) -> str | None:
    """The checkpoint folder to resume from: a path, 'auto' (newest complete one in out_dir, or none)."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        path = found[-1][1] if found else None
    else:
        path = resume
        if not os.path.exists(os.path.join(path, TRAINER_STATE)):
            raise FileNotFoundError(f"--resume {path}: no {TRAINER_STATE} there (not a complete checkpoint)")
    return broadcast_object(dist, path)


def load_trainer_state(dist: Dist, path: str) -> dict:
    """The trainer state, with this rank's RNG states restored."""
    file = os.path.join(path, TRAINER_STATE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{file}: cannot read trainer state: {e}") from None
    if state["world_size"] != dist.world_size:
        raise ValueError(f"{file} was written by {state['world_size']} ranks; resume with the same "
                         f"--nproc_per_node (this run has {dist.world_size})")
    set_rng_state(state["rng"][dist.rank])
    return state


def write_stage_model(folder: str, model, lora, tokenizer_path: str, base_model: str) -> None:
    """A stage's model files: PEFT adapter files (a reward model's new score head saved whole beside
    them, as PEFT's SEQ_CLS task does) or a full HF folder, plus the tokenizer."""
    if lora is None:
        pad_token_id = 0 if model.head == "score" else None  # transformers' sequence classifier needs one
        write_model_files(model, folder, tokenizer_path=tokenizer_path, pad_token_id=pad_token_id)
        return
    if model.head == "score":
        write_adapter(model, lora, folder, base_model=base_model, task_type="SEQ_CLS",
                      modules_to_save={"score.weight": model.score.weight})
    else:
        write_adapter(model, lora, folder, base_model=base_model)
    shutil.copyfile(tokenizer_path, os.path.join(folder, TOKENIZER))


def restore_training(dist: Dist, path: str, model, lora, optimizer, loader) -> dict:
    """Load a checkpoint's trained weights, optimizer and loader cursor (and this rank's RNG) in place."""
    state = load_trainer_state(dist, path)
    if lora is not None:
        load_adapter_weights(model, path)
    else:
        model.load_state_dict(load_checkpoint(path, head=model.head).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    return state


def save_stage_checkpoint(dist: Dist, cfg, step: int, model, lora, tokenizer_path: str, optimizer, loader,
                          bad_steps: int) -> str:
    """SFT's and RM's checkpoint: their model files plus optimizer, loader cursor and config."""
    return save_training_checkpoint(
        dist, cfg.out, step, lambda folder: write_stage_model(folder, model, lora, tokenizer_path, cfg.model),
        {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "bad_steps": bad_steps,
         "config": asdict(cfg)}, keep=cfg.keep)
