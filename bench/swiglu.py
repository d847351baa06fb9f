"""What SwiGLU keeps for backward, and its time: kernels/swiglu.py against silu(gate) * up under autograd.

    python bench/swiglu.py [--tokens 2048 --dim 576 --hidden 1536 --layers 30 --frozen]

A stack of --layers LLaMA MLPs (gate/up/down linears, SmolLM2-135M's widths by default) runs forward and
backward on --tokens rows; --frozen freezes the linears, as LoRA does (only the input needs a gradient).
Each variant runs in its own subprocess. "kept MiB" is the bytes of the distinct tensors autograd holds for
backward (counted by a saved_tensors_hooks pack hook, weights excluded); "peak MiB" is the process's peak
RSS above its inputs (getrusage); seconds are the best of 5 forward + backward passes after a warm-up.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import kept_peak_and_time, variants_in_fresh_processes  # (this script's own bench/common.py)

VARIANTS = ("reference", "swiglu")


def run_variant(name: str, args) -> dict:
    import torch
    import torch.nn as nn

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train as _this_checkout  # noqa: F401  train.py binds rlhf_engine to its own folder
    from rlhf_engine.kernels import swiglu as kernel

    torch.manual_seed(0)
    act = kernel.reference if name == "reference" else kernel.swiglu
    layers = [nn.ModuleList([nn.Linear(args.dim, args.hidden, bias=False), nn.Linear(args.dim, args.hidden, bias=False),
                             nn.Linear(args.hidden, args.dim, bias=False)]) for _ in range(args.layers)]
    weights = {p.data_ptr() for layer in layers for p in layer.parameters()}
    for p in (p for layer in layers for p in layer.parameters()):
        p.requires_grad_(not args.frozen)
    x0 = torch.randn(args.tokens, args.dim, requires_grad=True)

    def step():
        x = x0
        for gate, up, down in layers:
            x = x + down(act(gate(x), up(x)))
        x.square().mean().backward()
        for p in [x0, *(p for layer in layers for p in layer.parameters())]:
            p.grad = None

    return {"variant": name, **kept_peak_and_time(step, weights)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--frozen", action="store_true", help="freeze the linears (LoRA's case)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    shape = dict(tokens=args.tokens, dim=args.dim, hidden=args.hidden, layers=args.layers, frozen=args.frozen)
    flags = [f"--{k}={v}" for k, v in shape.items() if k != "frozen"] + (["--frozen"] if args.frozen else [])
    rows = variants_in_fresh_processes(__file__, flags, VARIANTS)
    print(f"{args.layers} MLPs {args.dim} -> {args.hidden} -> {args.dim}, {args.tokens} tokens, forward + backward, "
          f"linears {'frozen' if args.frozen else 'trained'}, fp32, torch threads={rows[0]['threads']}")
    print(f"{'variant':<12}{'kept MiB':>10}{'peak MiB above inputs':>24}{'seconds':>10}")
    for r in rows:
        print(f"{r['variant']:<12}{r['kept_mib']:>10.1f}{r['peak_mib_above_inputs']:>24.1f}{r['seconds']:>10.3f}")
    print(json.dumps({"bench": "swiglu", **shape, "results": rows}))


if __name__ == "__main__":
    main()
