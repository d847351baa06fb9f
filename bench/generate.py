"""Generation throughput: our KV-cache batched sampler against a plain no-cache loop.

The no-cache loop reruns the whole sequence every step (what a naive implementation does), so its
cost per token grows with the length. Both decode greedily from random-weight models, the same
prompts, the same number of new tokens (EOS disabled so every row runs to the cap).

    python bench/generate.py                 # tiny and llama-60m, batch 1 and 8
    python bench/generate.py --json out.jsonl

PPO's decode (--ppo): sampled at temperature 1 with per-row seeds as PPO samples, 64-token prompts,
48 new tokens (EOS disabled), llama-60m with LoRA r=16 on q/v, fp32 and bf16, batch 16 and 64, the
growing cache (drops finished rows) and the static one (StaticDecoder). --root DIR imports the engine
from another checkout (e.g. a `git worktree` of an earlier commit) for side-by-side runs; the static
cache is skipped where that engine lacks it.

    python bench/generate.py --ppo [--root ../prev] [--threads 2]

The LM head alone (--head): a decode step's logits for 1-64 rows at SmolLM2-135M's 49,152 x 576 head, fp32,
as h Wᵀ (F.linear) and as (W hᵀ)ᵀ (what generate's next_token_logits runs on CPU), best of --repeats x 20 calls.

    python bench/generate.py --head [--threads 2]

Prints a table and one JSON line per run (also appended to --json FILE if given).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--root" in sys.argv:  # the engine under test comes from this checkout (before any engine import)
    ROOT = os.path.abspath(sys.argv[sys.argv.index("--root") + 1])
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from common import best_time, emit_json  # noqa: E402  (this script's own bench/common.py, whatever --root is)
from rlhf_engine.engine.model.config import ModelConfig  # noqa: E402
from rlhf_engine.engine.model.generate import SamplingConfig, generate, left_pad  # noqa: E402
from rlhf_engine.engine.model.llama import LLaMA  # noqa: E402


@torch.no_grad()
def no_cache_greedy(model, prompts, max_new_tokens, pad_id=0):
    tokens, mask = left_pad(prompts, pad_id)
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=mask)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return tokens[:, -max_new_tokens:]


def ppo_decode(args) -> list[dict]:
    """Tokens/s of PPO's sampler at llama-60m: fp32/bf16 x batch 16/64 x growing/static cache."""
    import inspect

    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora
    from rlhf_engine.engine.model.precision import autocast
    has_static = "static_cache" in inspect.signature(generate).parameters
    cfg = ModelConfig.preset("llama-60m")
    rows = []
    for dtype in ("fp32", "bf16"):
        model = LLaMA(cfg).init_weights(generator=torch.Generator().manual_seed(0))
        model = apply_lora(model.to(torch.bfloat16) if dtype == "bf16" else model, LoRAConfig(r=16)).eval()
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.data = p.data.float()  # float32 adapters on the base, as PPO builds them
        for B in (16, 64):
            prompts = torch.randint(3, cfg.vocab_size, (B, 64), generator=torch.Generator().manual_seed(B)).tolist()
            sampling = SamplingConfig(max_new_tokens=48, temperature=1.0)
            for static in ((False, True) if has_static else (False,)):
                kw = {"static_cache": True} if static else {}

                def run():
                    with autocast(torch.device("cpu"), dtype):
                        generate(model, prompts, sampling, eos_id=-1, pad_id=0, row_seeds=list(range(B)), **kw)
                seconds = best_time(run, args.repeats)
                rows.append(dict(bench="generate_ppo", engine=ROOT, dtype=dtype, batch=B, static_cache=static,
                                 prompt_len=64, new_tokens=48, seconds=round(seconds, 3),
                                 tok_s=round(B * 48 / seconds, 1), threads=torch.get_num_threads(),
                                 torch=torch.__version__, machine=platform.machine(), cpu_count=os.cpu_count()))
                print(f"{dtype} batch {B:>3} {'static ' if static else 'growing'} cache: {seconds:6.2f} s, "
                      f"{B * 48 / seconds:7.1f} tok/s", flush=True)
    return rows


def head_forms(args) -> list[dict]:
    """ms per call of the decode step's LM head, h Wᵀ against (W hᵀ)ᵀ, for 1-64 rows."""
    weight = torch.randn(49152, 576, generator=torch.Generator().manual_seed(0))
    rows = []
    print(f"{'rows':>4} {'h Wᵀ ms':>9} {'(W hᵀ)ᵀ ms':>12} {'ratio':>6}")
    for b in (1, 4, 16, 64):
        hidden = torch.randn(b, 576)
        linear = best_time(lambda: [torch.nn.functional.linear(hidden, weight) for _ in range(20)], args.repeats) / 20
        flipped = best_time(lambda: [(weight @ hidden.T).T.contiguous() for _ in range(20)], args.repeats) / 20
        rows.append(dict(bench="generate_head", rows=b, vocab=49152, dim=576, linear_ms=round(1e3 * linear, 3),
                         flipped_ms=round(1e3 * flipped, 3), threads=torch.get_num_threads(), torch=torch.__version__))
        print(f"{b:>4} {1e3 * linear:>9.2f} {1e3 * flipped:>12.2f} {linear / flipped:>5.2f}x", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppo", action="store_true", help="PPO's sampled decode at llama-60m instead (see above)")
    ap.add_argument("--head", action="store_true", help="the decode step's LM head alone, two forms (see above)")
    ap.add_argument("--root", help="import the engine from this checkout")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-60m"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ppo:
        emit_json(ppo_decode(args), args.json)
        return
    if args.head:
        emit_json(head_forms(args), args.json)
        return

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
            ours = best_time(lambda: generate(model, prompts, sampling, eos_id=-1, pad_id=0), args.repeats)
            plain = best_time(lambda: no_cache_greedy(model, prompts, args.new_tokens), args.repeats)
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
