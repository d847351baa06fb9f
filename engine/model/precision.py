"""Compute dtypes by name, and the autocast context every forward runs under.

Flags name dtypes ("fp32", "bf16"); code needs torch dtypes. With LoRA the frozen base is stored in
the compute dtype and the trained tensors stay float32 masters; the forward runs under autocast in
the compute dtype either way, so optimizer updates never round to bf16.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: str):
    """Mixed-precision context for the forward pass (a no-op for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch_dtype(dtype), enabled=dtype != "fp32")
