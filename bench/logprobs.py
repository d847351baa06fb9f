"""Peak memory and time of kernels/logprobs.py against the plain log_softmax reference, forward + backward.

    python bench/logprobs.py [--batch 2 --seq 1024 --vocab 32000 --dim 512 --dtype float32]
    python bench/logprobs.py --batch 4 --seq 511 --vocab 49152 --dim 576 --dtype autocast-bf16

--dtype autocast-bf16: float32 inputs (a float32 master head, as full fine-tuning keeps it) under
torch.autocast(bf16), as `train.py sft --dtype bf16` runs the loss.

Memory method: each variant runs in its own fresh subprocess. It builds its inputs, reads the process's
peak resident set size (getrusage ru_maxrss, the kernel's high-water mark of real pages, so nothing
torch-specific is trusted), runs one forward + backward, and reads the peak again; the difference is the
most memory the step ever held above its inputs (outputs and gradients included: the gradient of a
[B, T, V] logits input is itself [B, T, V] and is part of every logits variant's number). CPU torch
returns large blocks to the OS on free, so one process per variant keeps variants from sharing pages.
Time: the best of 3 further runs in the same process, by the wall clock on all threads, or with
--clock cpu by one torch thread's own CPU time (other jobs on shared cores cannot inflate it).
The frozen-head variants give log-probs only and leave the LM-head weight without a gradient (LoRA SFT, DPO).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from common import variants_in_fresh_processes  # (this script's own bench/common.py)

# frozen-head: the LM head frozen and log-probs only (LoRA SFT, DPO), where the kernel keeps d logprob / d hidden
VARIANTS = ("logits/reference", "logits/chunked", "hidden/reference", "hidden/chunked", "frozen-head/reference",
            "frozen-head/chunked")


def run_variant(name: str, args) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder
    from rlhf_engine.kernels import logprobs as lp_kernel

    clock = time.perf_counter
    if args.clock == "cpu":
        clock = time.thread_time
        torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = torch.float32 if args.dtype == "autocast-bf16" else getattr(torch, args.dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "autocast-bf16")
    B, T, V, D = args.batch, args.seq, args.vocab, args.dim
    tokens = torch.randint(0, V, (B, T))
    weights = torch.randn(B, T)  # stands in for advantages / mask weights
    source, impl = name.split("/")
    if source == "logits":
        inputs = [torch.randn(B, T, V, dtype=dtype, requires_grad=True)]
    else:
        inputs = [torch.randn(B, T, D, dtype=dtype, requires_grad=True),
                  (torch.randn(V, D, dtype=dtype) / D**0.5).requires_grad_(source == "hidden")]

    def step():  # the forward under autocast (a no-op unless --dtype autocast-bf16), backward outside it
        with autocast:
            loss, wrt = forward()
        return torch.autograd.grad(loss, wrt)

    def forward():
        if source == "frozen-head":
            fn = lp_kernel.hidden_reference if impl == "reference" else lp_kernel.hidden_token_logprobs
            logprobs = fn(*inputs, tokens)
            logprobs = logprobs[0] if impl == "reference" else logprobs
            return (logprobs * weights).sum(), inputs[0]
        if impl == "reference":
            fn = lp_kernel.reference if source == "logits" else lp_kernel.hidden_reference
            logprobs, entropy = fn(*inputs, tokens)
        elif source == "logits":
            logprobs, entropy = lp_kernel.token_logprobs_and_entropy(*inputs, tokens)
        else:
            logprobs, entropy = lp_kernel.hidden_token_logprobs(*inputs, tokens, with_entropy=True)
        return (logprobs * weights).sum() + 0.01 * entropy.sum(), inputs

    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return {"variant": name, "peak_mib_above_inputs": round((peak_kib - base_kib) / 1024, 1),
            "seconds": round(min(times), 4), "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "autocast-bf16"))
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    shape = dict(batch=args.batch, seq=args.seq, vocab=args.vocab, dim=args.dim, dtype=args.dtype, clock=args.clock)
    flags = [f"--{k}={v}" for k, v in shape.items()]
    rows = variants_in_fresh_processes(__file__, flags, VARIANTS)
    print(f"token log-probs (+ entropy, except frozen-head), forward+backward, B={args.batch} T={args.seq} "
          f"V={args.vocab} D={args.dim} {args.dtype}, {args.clock} clock, torch threads={rows[0]['threads']}")
    print(f"{'variant':<22}{'peak MiB above inputs':>24}{'seconds':>10}")
    for r in rows:
        print(f"{r['variant']:<22}{r['peak_mib_above_inputs']:>24.1f}{r['seconds']:>10.3f}")
    print(json.dumps({"bench": "logprobs", **shape, "results": rows}))


if __name__ == "__main__":
    main()
