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
from typing import Callable

import numpy as np
import torch

from engine.checkpoint import atomic_dir
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


def seed_everything(seed: int) -> None:
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
