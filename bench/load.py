"""Loading a checkpoint: seconds and peak RSS against the size of the model it builds.

    python bench/load.py --model ../shared/data/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/load.py --model CKPT --dtypes fp32 bf16 8bit --json out.jsonl

Each configuration runs in its own process. `before` is that process's RSS after its imports and after
building one embedding on the meta device (torch's first meta-device init touches ~74 MiB of library
pages, the same in every process, whatever it then loads); `peak` is ru_maxrss over the whole load;
`model` is the tensors the load produced (tied tensors once). The target (issue 22): peak - before
<= 1.2 x model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from bench.common import emit_json  # noqa: E402

WORKER = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {root!r})
import train
from rlhf_engine.engine.model.int8 import quantize_on_load
from rlhf_engine.engine.weights.load import load_checkpoint

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

torch.nn.Embedding(8, 8, device="meta")  # warm the meta device's library pages
before = rss_mib()
t0 = time.perf_counter()
dtype = {{"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.bfloat16}}[{dtype!r}]
model = load_checkpoint({model!r}, dtype=dtype, transform=quantize_on_load if {dtype!r} == "8bit" else None)
seconds = time.perf_counter() - t0
seen, size = set(), 0
for t in list(model.parameters()) + list(model.buffers()):
    if t.data_ptr() not in seen:
        seen.add(t.data_ptr())
        size += t.numel() * t.element_size()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(dtype={dtype!r}, seconds=round(seconds, 2), model_mib=round(size / 2**20, 1),
                      before_mib=round(before, 1), peak_mib=round(peak, 1),
                      load_over_model=round((peak - before) / (size / 2**20), 3))))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint: HF folder, GGUF file, Meta folder, llama2.c .bin")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "8bit"], choices=["fp32", "bf16", "8bit"])
    ap.add_argument("--json", help="append the JSON lines here too")
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes:
        code = WORKER.format(root=ROOT, dtype=dtype, model=os.path.abspath(args.model))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{dtype}: {out.stderr.strip().splitlines()[-1]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"bench": "load", "model": os.path.basename(os.path.normpath(args.model)), **row,
                     "machine": platform.machine(), "cpu_count": os.cpu_count()})
    print(f"{'dtype':6} {'seconds':>8} {'model MiB':>10} {'peak - before':>14} {'x model':>8}")
    for r in rows:
        print(f"{r['dtype']:6} {r['seconds']:8.2f} {r['model_mib']:10.1f} {r['peak_mib'] - r['before_mib']:14.1f} "
              f"{r['load_over_model']:8.3f}")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
