"""What LoRA's update with dropout keeps for backward, and its time: kernels/lora.py against PEFT's
linear(linear(dropout(x), A), B) under autograd.

    python bench/lora_update.py [--tokens 2048 --dim 576 --kv-dim 192 --rank 16 --dropout 0.05 --layers 30]

A stack of --layers blocks, each a normalisation and LoRA on q_proj and v_proj (frozen base weights, SmolLM2-135M's
widths by default, as StackLLaMA adapts them), runs forward and backward on --tokens rows. Each variant runs in
its own subprocess. "kept MiB" is the bytes of the distinct tensors autograd holds for backward (counted by a
saved_tensors_hooks pack hook, weights excluded); "peak MiB" is the process's peak RSS above its inputs
(getrusage); seconds are the best of 5 forward + backward passes after a warm-up. Prints a table, then one JSON
line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import kept_peak_and_time, variants_in_fresh_processes  # (this script's own bench/common.py)

VARIANTS = ("reference", "lora_update")


def run_variant(name: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train as _this_checkout  # noqa: F401  train.py binds rlhf_engine to its own folder
    from rlhf_engine.kernels import lora as kernel

    torch.manual_seed(0)
    update = kernel.reference if name == "reference" else kernel.lora_update
    scaling = 32 / args.rank

    def adapted(out_dim):  # a frozen base weight and a trained (A, B) pair
        return (torch.randn(out_dim, args.dim) / args.dim ** 0.5,
                (torch.randn(args.rank, args.dim) / args.dim ** 0.5).requires_grad_(),
                (torch.randn(out_dim, args.rank) / args.rank ** 0.5).requires_grad_())
    layers = [(adapted(args.dim), adapted(args.kv_dim)) for _ in range(args.layers)]
    weights = {t.data_ptr() for layer in layers for lin in layer for t in lin}
    x0 = torch.randn(args.tokens, args.dim, requires_grad=True)

    def step():
        x, values = x0, 0.0
        for (wq, aq, bq), (wv, av, bv) in layers:
            h = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)  # the block's normed input
            x = x + F.linear(h, wq) + update(h, aq, bq, scaling, args.dropout, True)
            values = values + (F.linear(h, wv) + update(h, av, bv, scaling, args.dropout, True)).sum()
        (x.square().mean() + values * 1e-6).backward()
        for t in [x0, *(t for layer in layers for lin in layer for t in lin[1:])]:
            t.grad = None

    return {"variant": name, **kept_peak_and_time(step, weights)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--kv-dim", type=int, default=192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    shape = dict(tokens=args.tokens, dim=args.dim, kv_dim=args.kv_dim, rank=args.rank, dropout=args.dropout,
                 layers=args.layers)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    rows = variants_in_fresh_processes(__file__, flags, VARIANTS)
    print(f"{args.layers} blocks of LoRA r={args.rank} on q ({args.dim} -> {args.dim}) and v ({args.dim} -> "
          f"{args.kv_dim}), dropout {args.dropout}, {args.tokens} tokens, forward + backward, fp32, "
          f"torch threads={rows[0]['threads']}")
    print(f"{'variant':<14}{'kept MiB':>10}{'peak MiB above inputs':>24}{'seconds':>10}")
    for r in rows:
        print(f"{r['variant']:<14}{r['kept_mib']:>10.1f}{r['peak_mib_above_inputs']:>24.1f}{r['seconds']:>10.3f}")
    print(json.dumps({"bench": "lora_update", **shape, "results": rows}))


if __name__ == "__main__":
    main()
