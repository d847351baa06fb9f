"""Distributed setup as explicit values: read torchrun's environment, return a frozen Dist.

gloo on CPU, NCCL on CUDA; a plain `python train.py ...` is a world of one with no process group.
Collectives go through the small helpers here, which are no-ops in a world of one, so training code
reads the same either way. The process-group timeout turns a dead rank into a clear error on the
others instead of a hang. (nanoGPT's env-var DDP setup, without its globals.)
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


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
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                      timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, is_main=rank == 0)


def close_dist(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
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
    """Every rank's `obj` (picklable, small: RNG states, cursors), in rank order."""
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
