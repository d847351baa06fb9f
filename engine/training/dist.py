"""Distributed setup as explicit values: read torchrun's environment, return a frozen Dist.

gloo on CPU, NCCL on CUDA; a plain `python train.py ...` is a world of one with no process group.
Collectives go through the small helpers here, which are no-ops in a world of one, so training code
reads the same either way. The process-group timeout turns a dead rank into a clear error on the
others instead of a hang. Under torchrun every rank dies with its launcher: torchrun starts ranks in
sessions of their own, so a launcher killed with SIGKILL would otherwise leave them training on,
writing into the run folder of whatever run comes next. (nanoGPT's env-var DDP setup, without its
globals.)
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

# The parent when this module was first imported, early in the process: a parent that is gone by the
# time init_dist runs shows as a different parent pid (the re-parenting init or subreaper).
_PARENT_AT_START = os.getppid()
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_dist(device: str | None = None, timeout_s: float = 600.0) -> Dist:
    """Join the torchrun process group if there is one. device: 'cpu', 'cuda' or None (cuda if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        die_with_parent()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    set_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, is_main=rank == 0)


def set_threads(local_world_size: int) -> int:
    """CPU threads per rank: OMP_NUM_THREADS when set (torchrun sets 1 for more than one rank unless you
    set it), else the cores shared out among this machine's ranks. Ranks that together ask for more
    threads than there are cores slow each other down many times over."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(threads)
    return threads


def die_with_parent(poll_s: float = 1.0) -> None:
    """End this process at once when its parent, the launcher, is gone. On Linux the kernel sends
    SIGKILL (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls the parent pid every `poll_s` seconds.
    Nothing is lost by dying this way: checkpoints are written atomically and the run lock is the
    kernel's (engine/training/train_state.py)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != _PARENT_AT_START:  # the parent died before the kernel was told to watch it
                os.kill(os.getpid(), signal.SIGKILL)
            return

    def watch():
        while os.getppid() == _PARENT_AT_START:
            time.sleep(poll_s)
        os._exit(1)  # ends the whole process at once, from any thread, on any platform
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def close_dist(dist: Dist, timeout_s: float = 10.0) -> None:
    """Leave the process group together. A gloo rank that tears it down while a peer is still busy
    can abort at exit ("terminate called without an active exception", seen about once in eight 2-rank
    runs), so the ranks meet first; a rank whose peers do not come (they failed elsewhere) stops waiting
    after timeout_s."""
    if dist.enabled and torch_dist.is_initialized():
        if torch_dist.get_backend() == "gloo":
            with contextlib.suppress(RuntimeError):
                torch_dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        torch_dist.destroy_process_group()


def grad_sync(dist: Dist, model, sync: bool):
    """Inside the block DDP all-reduces gradients only if `sync` (the last micro-batch of a gradient
    accumulation); without a process group it is a no-op."""
    return contextlib.nullcontext() if sync or not dist.enabled else model.no_sync()


def all_reduce_sum(dist: Dist, x: torch.Tensor) -> torch.Tensor:
    """Sum of x over ranks (a new tensor; x itself untouched)."""
    x = x.clone()
    if dist.enabled:
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x


def all_reduce_named(dist: Dist, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each named scalar summed over ranks, in one collective; the values keep their dtype until they
    come back as Python floats. Divide a token-weighted sum by the summed token count yourself."""
    if not sums:
        return {}
    total = all_reduce_sum(dist, torch.stack([torch.as_tensor(v) for v in sums.values()]))
    return dict(zip(sums, total.tolist()))


def all_reduce_max(dist: Dist, x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    if dist.enabled:
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX)
    return x


def all_gather_objects(dist: Dist, obj) -> list:
    """Every rank's `obj` (picklable, small: RNG states, cursors, per-pair outcomes), in rank order."""
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(dist: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()
