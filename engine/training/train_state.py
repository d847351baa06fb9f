"""Training checkpoints: model files plus a separate trainer state, written atomically, found for resume.

A checkpoint is `OUT/checkpoint-000123/`: the model part (HF folder and/or PEFT adapter files) and
`trainer_state.pt` (optimizer, step, loader cursors, every rank's RNG states, stage extras). The whole
folder is built under a hidden temp name and renamed into place, so `--resume auto` can trust any
`checkpoint-*` folder it sees: a save killed midway (even by SIGKILL) leaves only a hidden temp folder.
Rotation (`keep`) renames an old checkpoint to a hidden name before deleting it, for the same reason.

One run per output folder: `lock_run_folder` takes an flock on OUT/.lock before anything is written
(the kernel drops it when the process dies, however it dies, so no lock is ever stale) and clears the
hidden folders that killed saves and rotations left behind.

The trainer state holds only tensors and plain Python values, and is read back with
torch.load(weights_only=True): resuming never unpickles arbitrary objects.
"""
from __future__ import annotations

import errno
import fcntl
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import IO, Callable

import numpy as np
import torch

from rlhf_engine.engine.weights.adapters import load_adapter_weights, write_adapter
from rlhf_engine.engine.weights.atomic import atomic_dir
from rlhf_engine.engine.weights.hf_folder import torch_load_weights, write_model_files
from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.data.tokenizer import Tokenizer
from rlhf_engine.engine.training.dist import Dist, all_gather_objects, broadcast_object

TRAINER_STATE = "trainer_state.pt"
LOCK = ".lock"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# What killed saves (atomic_dir's .tmp-/.old-) and killed rotations (.trash-) leave behind.
_PARTIAL = re.compile(r"^\.checkpoint-\d+\.(tmp|old|trash)-")
_HELD: dict[str, IO] = {}  # folder -> its open lock file, held until this process exits


def lock_run_folder(dist: Dist, out_dir: str) -> IO | None:
    """Collective: make `out_dir` this run's alone, before anything is written to it. Rank 0 creates the
    folder and takes an exclusive flock on OUT/.lock (holding its pid), then removes partial checkpoints
    left by killed runs. A second run on the folder fails at once, on every rank, with one line naming
    the holder's pid. The lock lasts as long as this process (a later stage run by the same process on
    the same folder keeps it); the kernel releases it when the process dies. Returns rank 0's lock file."""
    error = None
    if dist.is_main:
        try:
            _lock(out_dir)
            remove_partial_checkpoints(out_dir)
        except ValueError as e:
            error = str(e)
    error = broadcast_object(dist, error)
    if error:
        raise ValueError(error)
    return _HELD.get(os.path.realpath(out_dir))


def _lock(out_dir: str) -> None:
    key = os.path.realpath(out_dir)
    if key in _HELD:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, LOCK), "a+")
    except OSError as e:
        raise ValueError(f"--out {out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(20):  # the holder writes its pid just after locking
            f.seek(0)
            holder = f.read().strip()
            if holder:
                break
            time.sleep(0.05)
        f.close()
        raise ValueError(f"--out {out_dir} is in use by another run (pid {holder or 'unknown'}); wait for it to "
                         "end or choose another --out") from None
    except OSError as e:  # e.g. a network file system without locks
        f.close()
        raise ValueError(f"--out {out_dir}: cannot lock {LOCK} there ({e.strerror or e})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = f


def remove_partial_checkpoints(out_dir: str) -> list[str]:
    """Delete the hidden folders of saves and rotations that were killed midway; returns their names.
    Call it only while holding the folder's lock: another run's save in progress looks the same."""
    removed = sorted(name for name in os.listdir(out_dir) if _PARTIAL.match(name))
    for name in removed:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return removed


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


def row_seed(seed: int, *ids: int) -> int:
    """The seed of one row's (or one step's) own generator, from the run's seed and the row's ids (a global row
    index; question and sample; step and rank): independent of batching and world size, so a row draws the
    same sample wherever it lands. seed·1,000,003 + the ids read as digits in base 1,009 (primes: distinct
    for ids below 1,009 after the first)."""
    mixed = 0
    for i in ids:
        mixed = mixed * 1009 + i
    return seed * 1_000_003 + mixed


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
                             state: dict, keep: int | None = None, protect: str | None = None) -> str:
    """Collective: every rank contributes its RNG state; rank 0 writes, then deletes all but the newest `keep`
    checkpoints, `protect` aside (e.g. PPO's best by the judge). Returns the folder."""
    rngs = all_gather_objects(dist, rng_state())
    path = checkpoint_path(out_dir, step)
    failure = None
    if dist.is_main:
        try:
            with atomic_dir(path) as tmp:
                write_model(tmp)
                # Through a Python file, so that a full disk surfaces as the OSError it is.
                with open(os.path.join(tmp, TRAINER_STATE), "wb") as f:
                    torch.save({**state, "step": step, "world_size": dist.world_size, "rng": rngs}, f)
            if keep:
                for _, old in [c for c in list_checkpoints(out_dir) if c[1] != protect][:-keep]:
                    _delete_checkpoint(old)
        except Exception as e:
            failure = e
    # Every rank waits here for rank 0's save; a failure on the disk's side stops them all with one line.
    message = broadcast_object(dist, None if failure is None else _save_error(out_dir, path, failure))
    if message:
        raise ValueError(message)
    if failure is not None:
        raise failure  # a bug, not the disk: keep its traceback
    return path


def _save_error(out_dir: str, path: str, e: Exception) -> str | None:
    """One line for a save that failed on the disk's side (None for anything else)."""
    cause: BaseException | None = e
    while cause is not None:  # torch and safetensors wrap the OSError in errors of their own
        if (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) or \
                f"os error {errno.ENOSPC}" in str(cause):
            found = list_checkpoints(out_dir)
            last = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was completed yet"
            return f"disk full while saving {path}: {last} (free some space, then resume with --resume auto)"
        cause = cause.__cause__ or cause.__context__
    if isinstance(e, OSError):
        return f"cannot save {path}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
    return None


def _delete_checkpoint(path: str) -> None:
    """Rename to a hidden name, then delete: a kill in between leaves a hidden folder (cleared at the next
    start), never a half-deleted checkpoint under a name `--resume auto` would take."""
    parent, name = os.path.split(path)
    trash = tempfile.mkdtemp(prefix=f".{name}.trash-", dir=parent)
    os.rename(path, os.path.join(trash, name))
    shutil.rmtree(trash)


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
    state = _read_trainer_state(dist, path, mmap=False)
    set_rng_state(state["rng"][dist.rank])
    return state


def resumed_step(dist: Dist, path: str | None) -> int:
    """The step a run resuming from `path` starts at (0 for a fresh run): where its Logger cuts the logs."""
    return _read_trainer_state(dist, path, mmap=True)["step"] if path else 0  # mmap: the tensors stay unread


def _read_trainer_state(dist: Dist, path: str, mmap: bool) -> dict:
    file = os.path.join(path, TRAINER_STATE)
    state = torch_load_weights(file, mmap=mmap)  # refuses pickled objects, naming the file
    if state["world_size"] != dist.world_size:
        raise ValueError(f"{file} was written by {state['world_size']} ranks; resume with the same "
                         f"--nproc_per_node (this run has {dist.world_size})")
    return state


def write_stage_model(folder: str, model, lora, tokenizer, base_model: str) -> None:
    """A stage's model files: PEFT adapter files (a reward model's new score head saved whole beside
    them, as PEFT's SEQ_CLS task does) or a full HF folder, plus the tokenizer."""
    if lora is None:
        pad_token_id = 0 if model.head == "score" else None  # transformers' sequence classifier needs one
        write_model_files(model, folder, tokenizer=tokenizer, pad_token_id=pad_token_id)
        return
    if model.head == "score":
        write_adapter(model, lora, folder, base_model=base_model, task_type="SEQ_CLS",
                      modules_to_save={"score.weight": model.score.weight})
    else:
        write_adapter(model, lora, folder, base_model=base_model)
    (tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)).save(folder)


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


def resume_if_asked(dist: Dist, cfg, model, lora, optimizer, loader, guard) -> tuple[int, str | None]:
    """SFT's and RM's --resume: (the step to start at, the checkpoint resumed from, or None), with the
    weights, optimizer, loader cursor, RNG and the non-finite-step count restored in place."""
    resume_from = resolve_resume(dist, cfg.resume, cfg.out)
    if not resume_from:
        return 0, None
    state = restore_training(dist, resume_from, model, lora, optimizer, loader)
    guard.count = state["bad_steps"]
    return state["step"], resume_from


def save_stage_checkpoint(dist: Dist, cfg, step: int, model, lora, tokenizer, optimizer, loader,
                          bad_steps: int) -> str:
    """SFT's and RM's checkpoint: their model files plus optimizer, loader cursor and config."""
    return save_training_checkpoint(
        dist, cfg.out, step, lambda folder: write_stage_model(folder, model, lora, tokenizer, cfg.model),
        {"optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "bad_steps": bad_steps,
         "config": asdict(cfg)}, keep=cfg.keep)
