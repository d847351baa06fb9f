"""Seconds to evaluate two models on N held-out questions with `train.py eval`, and where they go.

Two arms at a preset's shape (a random base checkpoint, and the same base with a random LoRA adapter),
one judge (a random reward model of the same shape), the questions of the synthetic site's evaluation
split repeated to N prompts, 64-token prompts at most and --max-new-tokens answers. The phases are
eval's own timers: sampling (both models), the exact KL of the second model to the first, and scoring
(every answer of both models and both human answers, by the judge).

    python bench/eval.py                                   # llama-60m, 256 prompts, 48 new tokens
    python bench/eval.py --preset tiny --prompts 64 --json out.jsonl

Prints a table and a JSON line (also appended to --json FILE).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from bench.common import emit_json, random_base_checkpoint, synthetic_pairs, tokenizer_for  # noqa: E402

LLAMA_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "data", "llama-tokenizer", "tokenizer.model")


def build(args, work: str):
    """(base, adapter, judge, evaluation data folder) for the preset, built once in `work`."""
    import torch

    from rlhf_engine.data.pairs_io import PairWriter, read_pairs
    from rlhf_engine.engine.weights.adapters import save_adapter
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora
    _, texts = synthetic_pairs(work, 1500)
    tok, note = tokenizer_for(ModelConfig.preset(args.preset).vocab_size, texts, work, args.llama_tokenizer)
    from rlhf_engine.data.tokenizer import Tokenizer
    cfg = ModelConfig.preset(args.preset, vocab_size=Tokenizer(tok).vocab_size)
    base = random_base_checkpoint(cfg, tok, os.path.join(work, "base"))
    lora = LoRAConfig(r=16, targets=("q_proj", "v_proj"), dropout=0.0)
    model = apply_lora(load_checkpoint(base), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, lora, os.path.join(work, "tuned"), base_model=base)
    save_model_folder(load_checkpoint(base, head="score"), os.path.join(work, "judge"), tokenizer=tok,
                      pad_token_id=0)
    table = read_pairs(os.path.join(work, "pairs", "evaluation"))
    rows = table.to_pylist()
    os.makedirs(os.path.join(work, "eval_data"), exist_ok=True)
    writer = PairWriter(os.path.join(work, "eval_data", "pairs.parquet"))
    for i in range(args.prompts):  # repeat the questions, each made distinct, up to N prompts
        row = dict(rows[i % len(rows)])
        row["question"] = f"{row['question']} ({i})"
        writer.write(row)
    writer.close()
    return base, os.path.join(work, "tuned"), os.path.join(work, "judge"), os.path.join(work, "eval_data"), note


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-60m")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--llama-tokenizer", default=LLAMA_TOKENIZER)
    ap.add_argument("--workdir", help="scratch folder (default: a temp folder)")
    ap.add_argument("--json", help="append the JSON line to this file")
    args = ap.parse_args()
    import torch

    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.evaluate import EvalConfig, evaluate
    from rlhf_engine.engine.model.generate import SamplingConfig
    work = args.workdir or tempfile.mkdtemp(prefix="bench-eval-")
    base, tuned, judge, data, note = build(args, work)
    t0 = time.time()
    result = evaluate(EvalConfig(models=(f"base={base}", f"tuned={tuned}"), judges=(f"judge={judge}",), data=data,
                                 out=os.path.join(work, "out"), batch_size=args.batch_size, device="cpu",
                                 sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, seed=0)),
                      init_dist("cpu"))
    total = time.time() - t0
    seconds = result["seconds"]
    row = dict(bench="eval", preset=args.preset, tokenizer=note, prompts=args.prompts, models=2,
               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, total_s=round(total, 1),
               **{f"{k}_s": round(v, 1) for k, v in seconds.items()},
               other_s=round(total - sum(seconds.values()), 1), threads=torch.get_num_threads(),
               machine=platform.machine(), torch=torch.__version__)
    print(f"\n| phase | seconds | share |\n| --- | --- | --- |")
    for phase in ("sampling", "kl", "scoring"):
        print(f"| {phase} | {seconds[phase]:.1f} | {seconds[phase] / total:.0%} |")
    print(f"| other (loading, statistics, report) | {row['other_s']:.1f} | {row['other_s'] / total:.0%} |")
    print(f"| total | {total:.1f} | |\n")
    emit_json([row], args.json)


if __name__ == "__main__":
    main()
