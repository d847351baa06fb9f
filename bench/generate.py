"""Generation throughput: our KV-cache batched sampler against a plain no-cache loop.

The no-cache loop reruns the whole sequence every step (what a naive implementation does), so its
cost per token grows with the length. Both decode greedily from random-weight models, the same
prompts, the same number of new tokens (EOS disabled so every row runs to the cap).

    python bench/generate.py                 # tiny and llama-60m, batch 1 and 8
    python bench/generate.py --json out.jsonl

Prints a table and one JSON line per run (also appended to --json FILE if given).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit_json  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from engine.generate import SamplingConfig, generate, left_pad  # noqa: E402
from engine.model import LLaMA  # noqa: E402


@torch.no_grad()
def no_cache_greedy(model, prompts, max_new_tokens, pad_id=0):
    tokens, mask = left_pad(prompts, pad_id)
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=mask)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return tokens[:, -max_new_tokens:]


def timed(fn, repeats):
    fn()  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-60m"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()

    rows = []
    for preset in args.presets:
        cfg = ModelConfig.preset(preset)
        torch.manual_seed(0)
        model = LLaMA(cfg).init_weights().eval()
        for B in args.batch_sizes:
            g = torch.Generator().manual_seed(B)
            # Ragged prompts: lengths spread over [prompt_len/2, prompt_len].
            prompts = [torch.randint(3, cfg.vocab_size, (int(args.prompt_len * (0.5 + 0.5 * i / max(B - 1, 1))),),
                                     generator=g).tolist() for i in range(B)]
            sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
            ours = timed(lambda: generate(model, prompts, sampling, eos_id=-1, pad_id=0), args.repeats)
            plain = timed(lambda: no_cache_greedy(model, prompts, args.new_tokens), args.repeats)
            check = generate(model, prompts, sampling, eos_id=-1, pad_id=0).response_tokens
            same = bool(torch.equal(check, no_cache_greedy(model, prompts, args.new_tokens)))
            n = B * args.new_tokens
            rows.append(dict(bench="generate", preset=preset, params=cfg.num_params(), batch=B,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             kv_cache_tok_s=round(n / ours, 1), no_cache_tok_s=round(n / plain, 1),
                             speedup=round(plain / ours, 2), same_tokens=same,
                             torch=torch.__version__, threads=torch.get_num_threads(),
                             machine=platform.machine(), cpu_count=os.cpu_count()))

    print(f"{'preset':<10} {'params':>10} {'batch':>5} {'kv-cache tok/s':>15} {'no-cache tok/s':>15} "
          f"{'speed-up':>8} {'same tokens':>11}")
    for r in rows:
        print(f"{r['preset']:<10} {r['params']:>10,} {r['batch']:>5} {r['kv_cache_tok_s']:>15,.1f} "
              f"{r['no_cache_tok_s']:>15,.1f} {r['speedup']:>7.2f}x {str(r['same_tokens']):>11}")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
