"""Float32 linears through oneDNN (kernels/linear.py) against F.linear (MKL), and packed weights for decode.

    python bench/linear.py [--rows 16 2048 --dim 576 --hidden 1536 --kv 192 --layers 30 --repeats 5 --json F]

SmolLM2-135M's seven projections per layer (q, k, v, o, gate, up, down) over --layers layers, each layer its
own weights so that, as in a real forward, they stream from memory rather than sit in cache. For each row
count: the forward x Wᵀ and the input's gradient g W (what a frozen LoRA base needs in backward), F.linear /
plain matmul against kernels.linear; then the forward by weights packed for that row count
(kernels.linear.pack, what generate's decode steps use), in float32 and bf16. Best of --repeats passes
after a warm-up, milliseconds for all layers, and GFLOP/s. Prints a table, then one JSON line per row.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from common import best_time, emit_json  # (this script's own bench/common.py)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: F401,E402  train.py binds rlhf_engine to its own folder
from rlhf_engine.kernels import linear as kl  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 2048])
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=192, help="k and v projections' width (GQA)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()
    if not kl.available():
        sys.exit("bench/linear.py: this torch has no oneDNN (torch.backends.mkldnn): nothing to compare")
    torch.manual_seed(0)
    d, h, kv = args.dim, args.hidden, args.kv
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (h, d), (h, d), (d, h)]  # [out, in]
    weights = [torch.randn(o, i) * 0.02 for _ in range(args.layers) for o, i in shapes]
    params = sum(w.numel() for w in weights)
    results = []
    print(f"{args.layers} layers x 7 projections of dim {d} / hidden {h} / kv {kv} ({params / 1e6:.1f}M weights), "
          f"torch threads={torch.get_num_threads()}, ms for all layers (GFLOP/s)")
    print(f"{'rows':>6} {'op':<22}{'F.linear / matmul':>20}{'kernels.linear':>18}{'speed-up':>10}")
    for rows in args.rows:
        flops = 2 * rows * params
        xs = {n: torch.randn(rows, n) for n in {i for _, i in shapes} | {o for o, _ in shapes}}

        def timed(fn):
            return best_time(lambda: [fn(w) for w in weights], args.repeats)

        cases = {
            "forward x Wt": (lambda w: F.linear(xs[w.shape[1]], w), lambda w: kl.linear(xs[w.shape[1]], w)),
            "input grad g W": (lambda w: xs[w.shape[0]] @ w, lambda w: kl.input_grad(xs[w.shape[0]], w)),
        }
        for dtype in (torch.float32, torch.bfloat16):
            packed = [kl.pack(w.to(dtype), rows) for w in weights]
            by_ptr = {w.data_ptr(): p for w, p in zip(weights, packed)}
            typed = {n: x.to(dtype) for n, x in xs.items()}
            cast = {w.data_ptr(): w.to(dtype) for w in weights}
            name = "packed " + ("fp32" if dtype == torch.float32 else "bf16")
            cases[name] = (lambda w, c=cast, t=typed: F.linear(t[w.shape[1]], c[w.data_ptr()]),
                           lambda w, c=cast, t=typed, p=by_ptr: kl.linear(t[w.shape[1]], c[w.data_ptr()],
                                                                          packed=p[w.data_ptr()]))
        with torch.no_grad():
            for op, (plain, fast) in cases.items():
                t_plain, t_fast = timed(plain), timed(fast)
                row = dict(bench="linear", rows=rows, op=op, dim=d, hidden=h, kv=kv, layers=args.layers,
                           plain_ms=round(t_plain * 1e3, 2), kernel_ms=round(t_fast * 1e3, 2),
                           plain_gflops=round(flops / t_plain / 1e9, 1), kernel_gflops=round(flops / t_fast / 1e9, 1),
                           speedup=round(t_plain / t_fast, 3), threads=torch.get_num_threads())
                results.append(row)
                print(f"{rows:>6} {op:<22}{row['plain_ms']:>10.1f} ({row['plain_gflops']:>5.0f})"
                      f"{row['kernel_ms']:>10.1f} ({row['kernel_gflops']:>4.0f}){row['speedup']:>9.2f}x")
    emit_json(results, args.json)


if __name__ == "__main__":
    main()
