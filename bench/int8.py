"""Time and accuracy of kernels/int8_matmul.py's implementations against the alternatives, per layer shape.

    python bench/int8.py [--shapes 4096x4096,512x512] [--tokens 1,16,256,2048] [--dtypes float32,bfloat16]

Rows: `fp` F.linear with the float weight (what 8-bit replaces), `reference` (dequantise + matmul),
`int_mm` (LLM.int8 on torch._int_mm, threshold 6), `int_mm t=0` (no outlier split), `bnb` (bitsandbytes
int8_mixed_scaled_mm, i.e. Linear8bitLt in eval mode; in train mode on CPU bitsandbytes 0.50 runs
MatMul8bitFp, which is dequantise + matmul: our `reference`), `w8pack` (torch._weight_int8pack_mm,
weight-only int8). Forward ms and forward+backward ms (grad w.r.t. the input only) per call.
Timing: the fastest of repeated calls, since other jobs on these 2 shared cores only ever add time; with
--clock cpu, one torch thread timed by its own CPU time, which other jobs cannot inflate. Calls rotate
through enough copies of the weight to overflow the last-level cache, so small-batch calls pay for reading
the weight as in a real model. Error: relative Frobenius error against float32 x @ w.T, with 4 input columns
scaled to 8 sigma (the outlier features LLM.int8 is about). Prints a markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder
from rlhf_engine.kernels import int8_matmul as K  # noqa: E402

CACHE_BYTES = 96 * 2**20  # rotate weight copies until this much: 3x the 32 MiB L3 measured here


CLOCK = time.perf_counter  # or time.thread_time with --clock cpu


def timed_ms(fn, copies: int, budget_s: float = 1.0) -> float:
    fn(0)
    times, start, k = [], time.perf_counter(), 0
    while (time.perf_counter() - start < budget_s or len(times) < 3) and len(times) < 200:
        t0 = CLOCK()
        fn(k % copies)
        times.append(CLOCK() - t0)
        k += 1
    return 1e3 * min(times)  # other jobs on the shared cores only ever add time


def candidates(weights, quantized, dtype, device):
    """name -> (forward(x, k), trains): k picks a weight copy; `trains` marks those that give grad x."""
    wd = [w.to(dtype) for w in weights]
    rows = {"fp": (lambda x, k: F.linear(x, wd[k]), True)}
    for name, impl, thr in (("reference", "reference", 6.0), ("int_mm", "int_mm", 6.0),
                            ("int_mm t=0", "int_mm", 0.0), ("bnb", "bitsandbytes", 6.0)):
        if K.available(impl, device):
            rows[name] = (lambda x, k, impl=impl, thr=thr: K.int8_linear(x, *quantized[k], threshold=thr, impl=impl),
                          True)
    rows["w8pack"] = (lambda x, k: torch._weight_int8pack_mm(x, quantized[k][0], quantized[k][1].to(dtype)), False)
    return rows


def bench_one(out_f, in_f, n, dtype, skip_slow):
    copies = max(1, -(-CACHE_BYTES // (out_f * in_f)))
    weights = [torch.randn(out_f, in_f) * in_f**-0.5 for _ in range(copies)]
    quantized = [K.quantize_int8(w) for w in weights]
    x = torch.randn(n, in_f)
    x[:, :4] *= 8.0
    exact = x @ weights[0].t()
    x = x.to(dtype)
    result = {}
    for name, (fwd, trains) in candidates(weights, quantized, dtype, x.device).items():
        if skip_slow and name == "w8pack" and (dtype == torch.float32 and n > 1 or n > 256):
            continue  # measured once: 10-40x slower than fp here; skipped to keep the run short
        err = ((fwd(x, 0).float() - exact).norm() / exact.norm()).item()
        row = {"fwd_ms": round(timed_ms(lambda k: fwd(x, k), copies), 3), "rel_err": float(f"{err:.2e}")}
        if trains:
            xg, grad_out = x.detach().requires_grad_(), torch.randn(n, out_f, dtype=dtype)
            row["fwd_bwd_ms"] = round(timed_ms(lambda k: torch.autograd.grad(fwd(xg, k), xg, grad_out), copies), 3)
        result[name] = row
    return result


def merge(old: dict | None, new: dict) -> dict:
    """Keep the fastest time per candidate over sweeps (errors do not change between sweeps)."""
    if old is None:
        return new
    return {name: {k: min(v, old[name][k]) if k.endswith("_ms") else v for k, v in row.items()}
            for name, row in new.items()}


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    backward = f"{row['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in row else "n/a"
    return f"{row['fwd_ms']:.2f} / {backward} / {row['rel_err']:.1e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x4096,512x512", help="out x in, comma separated")
    parser.add_argument("--tokens", default="1,16,256,2048")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeat", type=int, default=1, help="whole sweeps; each cell keeps its fastest")
    parser.add_argument("--all", action="store_true", help="also time the slow w8pack cases")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one torch thread, timed by its own CPU time, immune to other jobs")
    args = parser.parse_args()
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    torch.manual_seed(0)
    cells = [(shape, dtype, int(n)) for shape in args.shapes.split(",") for dtype in args.dtypes.split(",")
             for n in args.tokens.split(",")]
    results = {}
    for sweep in range(args.repeat):
        for shape, dtype, n in cells:
            out_f, in_f = (int(v) for v in shape.split("x"))
            print(f"sweep {sweep + 1}/{args.repeat}: {shape} {dtype} {n}", file=sys.stderr, flush=True)
            res = bench_one(out_f, in_f, n, getattr(torch, dtype), not args.all)
            results[shape, dtype, n] = merge(results.get((shape, dtype, n)), res)
    names = ("fp", "reference", "int_mm", "int_mm t=0", "bnb", "w8pack")
    print("| shape | dtype | tokens | " + " | ".join(names) + " |")
    print("|---" * (3 + len(names)) + "|")
    for (shape, dtype, n), res in results.items():
        cells = [cell(res.get(name)) for name in names]
        print(f"| {shape} | {dtype} | {n} | " + " | ".join(cells) + " |")
    print("cells: forward ms / forward+backward ms / relative error")
    print(json.dumps({"bench": "int8_matmul", "threads": torch.get_num_threads(), "clock": args.clock,
                      "repeat": args.repeat,
                      "results": [{"shape": s, "dtype": d, "tokens": n, **r} for (s, d, n), r in results.items()]}))


if __name__ == "__main__":
    main()
