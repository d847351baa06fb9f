"""Causal self-attention at SmolLM2-135M's heads (9 over 3, d 64), fp32: torch's CPU flash kernel (SDPA) against
kernels/attention.py's blocked matmuls, side by side in one process.

    python bench/causal_attention.py [--repeats 10] [--json FILE]

Shapes: SFT's and the RM's 4 rows x 512, and single rows as PPO's varlen groups run them (a call per row), at
lengths around kernels.attention.MIN_LENGTH. Time is the best of --repeats calls after a warm-up, forward alone
(no grad: scoring, prefill) and forward + backward (training), the two kernels alternating so a slow moment of
the machine hits both; all threads. Prints a table, then one JSON line per shape.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

import torch  # noqa: E402

from bench.common import best_time, emit_json  # noqa: E402
from rlhf_engine.kernels import attention as ka  # noqa: E402

SHAPES = [(4, 512), (4, 256), (1, 512), (1, 400), (1, 320), (1, 256), (4, 150), (1, 150)]  # (rows, length)
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
KERNELS = {"flash": ka.reference, "blocked": ka._BlockedCausal.apply}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per kernel and shape (the best is kept)")
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, BLOCK {ka.BLOCK}, MIN_LENGTH {ka.MIN_LENGTH}")
    print(f"{'rows x length':>13s} | {'forward ms: flash / blocked':>28s} | {'fwd+bwd ms: flash / blocked':>28s} | taken")
    results = []
    for rows, T in SHAPES:
        q = torch.randn(rows, HEADS, T, HEAD_DIM, generator=g, requires_grad=True)
        k, v = (torch.randn(rows, KV_HEADS, T, HEAD_DIM, generator=g, requires_grad=True) for _ in range(2))
        upstream = torch.randn(rows, HEADS, T, HEAD_DIM, generator=g)
        row = {"rows": rows, "length": T, "taken": "blocked" if ka.uses_blocked(q, k) else "flash"}
        for _ in range(2):  # alternate the kernels; keep each one's best
            for name, fn in KERNELS.items():
                with torch.no_grad():
                    fwd = 1e3 * best_time(lambda: fn(q, k, v), args.repeats)
                train = 1e3 * best_time(lambda: fn(q, k, v).backward(upstream), args.repeats)
                row[f"{name}_forward_ms"] = min(fwd, row.get(f"{name}_forward_ms", fwd))
                row[f"{name}_train_ms"] = min(train, row.get(f"{name}_train_ms", train))
        results.append(row)
        print(f"{rows:>4d} x {T:<6d} | {row['flash_forward_ms']:>12.2f} / {row['blocked_forward_ms']:<6.2f} "
              f"({row['flash_forward_ms'] / row['blocked_forward_ms']:.2f}x) | {row['flash_train_ms']:>12.2f} / "
              f"{row['blocked_train_ms']:<6.2f} ({row['flash_train_ms'] / row['blocked_train_ms']:.2f}x) | {row['taken']}")
    emit_json(results, args.json)


if __name__ == "__main__":
    main()
