"""Varlen attention's three plans side by side: a call per row, one padded call, and `varlen.plan_rows`.

    python bench/attention.py [--repeats 20] [--json FILE]

Each case is a packed batch of R rows with lengths drawn uniformly from a range (seeded), at the demo's
attention (4 heads over 2 kv heads, d 32) or SmolLM2-135M's (9 over 3, d 64), fp32. Time is the best of
`--repeats` runs after a warm-up, forward alone (no grad: scoring, prefill) and forward + backward (the
update), all threads. The plan's line says how many calls it chose and what share of its attended slots is
padding. This is the benchmark `varlen.CALL_COST` is fitted on: the plan should be at or near the faster of
the other two in every row. Prints a table, then one JSON line per case.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

import torch  # noqa: E402

from bench.common import best_time, emit_json  # noqa: E402
from rlhf_engine.engine.model import varlen  # noqa: E402
from rlhf_engine.engine.model.llama import attend_rows  # noqa: E402

DIMS = {"demo": (4, 2, 32), "135m": (9, 3, 64)}
CASES = [("demo", 16, 20, 40), ("demo", 16, 40, 80), ("demo", 32, 20, 80), ("demo", 64, 20, 40),
         ("demo", 64, 80, 160), ("135m", 4, 10, 400), ("135m", 16, 10, 300), ("135m", 16, 100, 140)]


def plan_for(name: str, lengths: tuple[int, ...], head_dims: int) -> varlen.RowGroups:
    cost = {"rows": 0.0, "one": 1e30}.get(name)
    if cost is None:
        return varlen.plan_rows(lengths, head_dims, torch.device("cpu"))
    saved, varlen.CALL_COST = varlen.CALL_COST, {"cpu": cost}
    try:
        return varlen.plan_rows(lengths, head_dims, torch.device("cpu"))
    finally:
        varlen.CALL_COST = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per plan (the best is kept)")
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CALL_COST {varlen.CALL_COST['cpu']:g}")
    print(f"{'dims':5s} {'rows':>4s} {'lengths':>8s} | {'forward ms: rows / one / plan':>30s} | "
          f"{'fwd+bwd ms: rows / one / plan':>30s} | plan")
    results = []
    for dims, R, low, high in CASES:
        heads, kv_heads, d = DIMS[dims]
        lengths = tuple(int(n) for n in torch.randint(low, high + 1, (R,), generator=generator))
        N = sum(lengths)
        q = torch.randn(N, heads, d, requires_grad=True)
        k, v = (torch.randn(N, kv_heads, d, requires_grad=True) for _ in range(2))
        row = {"dims": dims, "rows": R, "lengths": [low, high]}
        for name in ("rows", "one", "plan"):
            groups = plan_for(name, lengths, heads * d)
            with torch.no_grad():
                row[f"{name}_forward_ms"] = 1e3 * best_time(lambda: attend_rows(q, k, v, groups), args.repeats)
            row[f"{name}_train_ms"] = 1e3 * best_time(
                lambda: attend_rows(q, k, v, groups).square().sum().backward(), args.repeats)
            if name == "plan":
                slots = sum(rows * width for rows, width in groups.shapes)
                row["plan_calls"], row["plan_padding"] = len(groups.shapes), 1 - N / slots
        results.append(row)
        fwd = " / ".join(f"{row[f'{n}_forward_ms']:.2f}" for n in ("rows", "one", "plan"))
        train = " / ".join(f"{row[f'{n}_train_ms']:.2f}" for n in ("rows", "one", "plan"))
        print(f"{dims:5s} {R:4d} {low:>3d}-{high:<4d} | {fwd:>30s} | {train:>30s} | "
              f"{row['plan_calls']} calls, {row['plan_padding']:.0%} padding")
    emit_json(results, args.json)


if __name__ == "__main__":
    main()
