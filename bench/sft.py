"""SFT training throughput and MFU, and what keeping attention inside packed documents costs and buys.

1. Throughput: tokens/s and MFU as `engine.sft.train` reports them (metrics.jsonl, perf/tokens_per_s and
   perf/mfu, logged every step), for each preset × {full fine-tuning from a random init (--no-lora),
   LoRA r=16 on q_proj/v_proj of a saved random checkpoint} × {fp32, bf16}, packed rows of --seq-len
   tokens, --batch-size rows per step (--attention cross doc adds document-masked runs). The first step
   (AdamW allocating its state) is a warm-up and is left out. MFU is the engine's (engine/training/roofline.py):
   6·N FLOPs per token for full fine-tuning, 4·N under LoRA (no weight gradients for the frozen base),
   the LM head likewise, and causal attention at 4·dim per layer per attended key, x3 for its backward;
   over the matmul peak the run measured at its start (fp32 or bf16, same threads).
2. Document mask: SFT with document_mask=False (StackLLaMA: attention crosses the packed documents) and
   True (attention kept inside each document, positions restart per document), the same steps and
   seeds, full fine-tuning of a small model from scratch. Reports tokens/s and the loss on the held-out
   evaluation split (questions never trained on) three ways: as the engine evaluates the run (with its
   own mask setting), with documents masked (each answer sees only its own question: the inference-time
   condition), and with attention crossing documents.

    python bench/sft.py                                   # both parts, defaults below (~2 min quiet)
    python bench/sft.py --part throughput --presets llama-60m --seq-len 512 --attention cross doc
    python bench/sft.py --part mask --mask-preset demo --mask-steps 300 --seeds 0 1 2
    python bench/sft.py --json out.jsonl

The data is the synthetic StackExchange site (data/synthetic.py) through `prepare`: the finetune split
trains, the evaluation split is held out. Tokenizers are sentencepiece models trained on that text at
the preset's vocabulary size; a 32000-piece vocabulary cannot be learned from it, so llama-60m uses
LLaMA's tokenizer.model when present (--llama-tokenizer) and otherwise a 1000-piece synthetic one, which
shrinks its embeddings and LM head (the table's vocab column says which). Each run is a fresh
subprocess, so its peak RSS (getrusage ru_maxrss) is its own. Prints tables and one JSON line per run
(also appended to --json FILE if given).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from bench.common import (add_run_args, emit_json, preset_base_checkpoint, run_worker, synthetic_pairs,  # noqa: E402
                          tokenizer_for)

LLAMA_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "data", "llama-tokenizer", "tokenizer.model")


# ---- setup (parent process) -----------------------------------------------------------------------

def model_config(preset: str, vocab: int):
    from rlhf_engine.engine.model.config import ModelConfig
    return ModelConfig.preset(preset, vocab_size=vocab)


# ---- one run (child process) ----------------------------------------------------------------------

def run_sft(spec: dict) -> dict:
    """Train with spec["config"] (SFTConfig fields) and summarise metrics.jsonl after the warm-up step."""
    import torch

    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.model.lora import LoRAConfig
    from rlhf_engine.engine.sft import SFTConfig, train
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    lora = spec["config"]["lora"]  # JSON across the subprocess boundary: a dict of LoRAConfig fields, or None
    cfg = SFTConfig(**{**spec["config"], "lora": LoRAConfig(**lora) if lora is not None else None})
    final = train(cfg, init_dist("cpu"))
    with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "perf/tokens_per_s" in r]
    measured = [r for r in rows if r["step"] >= 1]  # step 0 is the warm-up
    tokens_per_step = cfg.batch_size * cfg.seq_len
    seconds = sum(tokens_per_step / r["perf/tokens_per_s"] for r in measured)
    tokens_per_s = tokens_per_step * len(measured) / seconds
    mfu_per_token_s = measured[0]["perf/mfu"] / measured[0]["perf/tokens_per_s"]  # the same for every step
    losses = [r["train/loss"] for r in rows]
    result = dict(tokens_per_s=tokens_per_s, mfu=tokens_per_s * mfu_per_token_s, s_per_step=seconds / len(measured),
                  measured_steps=len(measured), train_loss_first=losses[0],
                  train_loss_last10=statistics.mean(losses[-10:]), eval_loss=final["eval/loss"],
                  peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    if spec.get("cross_eval"):
        result.update(cross_evaluate(cfg))
    return result


def run_rm(spec: dict) -> dict:
    """Train a reward model with spec["config"] (RMConfig fields); tokens/s and MFU after the warm-up step."""
    import torch

    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.model.lora import LoRAConfig
    from rlhf_engine.engine.rm import RMConfig, train
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    lora = spec["config"]["lora"]
    cfg = RMConfig(**{**spec["config"], "lora": LoRAConfig(**lora) if lora is not None else None})
    train(cfg, init_dist("cpu"))
    with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
        measured = [r for r in map(json.loads, f) if "perf/tokens_per_s" in r and r["step"] >= 1]
    seconds = sum(1 / r["perf/pairs_per_s"] * cfg.batch_size for r in measured)
    tokens = sum(r["perf/tokens_per_s"] / r["perf/pairs_per_s"] * cfg.batch_size for r in measured)
    return dict(tokens_per_s=tokens / seconds, s_per_step=seconds / len(measured),
                mfu=statistics.mean(r["perf/mfu"] for r in measured), measured_steps=len(measured),
                tokens_per_pair=tokens / len(measured) / cfg.batch_size,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                threads=torch.get_num_threads(), torch=torch.__version__)


def cross_evaluate(cfg) -> dict:
    """Held-out loss of the final checkpoint with documents masked and with attention crossing them."""
    from dataclasses import replace

    from rlhf_engine.data.packing import sft_documents
    from rlhf_engine.data.pairs_io import read_pairs
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.sft import CausalLMLoss, evaluate, held_out_rows
    from rlhf_engine.engine.training.train_state import checkpoint_path
    model = load_checkpoint(checkpoint_path(cfg.out, cfg.max_steps))
    docs = sft_documents(read_pairs(cfg.eval_data), Tokenizer(cfg.tokenizer))
    loss_fn, dist = CausalLMLoss(model).eval(), init_dist("cpu")
    rows = held_out_rows(cfg, docs, cfg.eval_data)
    return {f"eval_loss_{name}": evaluate(replace(cfg, document_mask=masked), loss_fn, rows, dist)[0]
            for name, masked in (("doc_masked", True), ("crossing", False))}


# ---- driver ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "throughput", "rm", "mask"], default="all",
                    help="rm: reward-model training tokens/s and MFU on the reward split, same presets/modes/dtypes")
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-60m"], help="throughput: model presets")
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--attention", nargs="+", default=["cross"], choices=["cross", "doc"],
                    help="throughput: attention across packed documents (cross) or kept inside them (doc)")
    ap.add_argument("--steps", type=int, default=8, help="throughput: optimizer steps per run, the first a warm-up")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--mask-preset", default="tiny", help="document mask: model preset (full fine-tuning)")
    ap.add_argument("--mask-steps", type=int, default=200, help="document mask: optimizer steps per run")
    ap.add_argument("--mask-lr", type=float, default=3e-3, help="document mask: peak learning rate (cosine)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="document mask: seeds")
    add_run_args(ap, LLAMA_TOKENIZER)
    args = ap.parse_args()
    if args.worker:
        with open(args.worker) as f:
            stage = json.load(f).get("stage", "sft")
        run_worker(args.worker, run_rm if stage == "rm" else run_sft)
        return
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")

    work = args.workdir or tempfile.mkdtemp(prefix="bench_sft_")
    os.makedirs(work, exist_ok=True)
    try:
        pairs, texts = synthetic_pairs(work, 3000, text_split="finetune")
        throughput = run_throughput(args, work, pairs, texts) if args.part in ("all", "throughput") else []
        throughput += run_throughput(args, work, pairs, texts, "rm") if args.part in ("all", "rm") else []
        mask = run_mask(args, work, pairs, texts) if args.part in ("all", "mask") else []
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_throughput(throughput)
    print_mask(mask)
    emit_json(throughput + mask, args.json)


def run_one(work: str, name: str, config: dict, threads: int, cross_eval: bool = False, stage: str = "sft") -> dict:
    """One SFT (or RM) run in a fresh subprocess; the engine's log lines go to stderr, the summary comes back."""
    out = os.path.join(work, "runs", name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    spec = dict(config={**config, "out": out}, threads=threads, cross_eval=cross_eval, stage=stage,
                result=os.path.join(out, "result.json"))
    with open(os.path.join(out, "spec.json"), "w") as f:
        json.dump(spec, f)
    print(f"== {name}", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", os.path.join(out, "spec.json")],
                          stdout=sys.stderr, check=False)
    if not os.path.exists(spec["result"]):
        return {"error": f"exit status {done.returncode}"}
    with open(spec["result"]) as f:
        return json.load(f)


def common(args) -> dict:
    return dict(machine=platform.machine(), cpu_count=os.cpu_count(), seq_len=args.seq_len,
                batch_size=args.batch_size)


def run_throughput(args, work: str, pairs: str, texts: list[str], stage: str = "sft") -> list[dict]:
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.model.config import ModelConfig
    rows = []
    for preset in args.presets:
        tok, tok_note = tokenizer_for(ModelConfig.preset(preset).vocab_size, texts, work, args.llama_tokenizer)
        vocab = Tokenizer(tok).vocab_size
        for mode in args.modes:
            # LoRA on a random preset is refused by the engine (it learns little): adapt a saved random base.
            model = preset_base_checkpoint(preset, tok, work) if mode == "lora" else preset
            for dtype, attention in itertools.product(args.dtypes, args.attention if stage == "sft" else ["cross"]):
                lora = {"r": args.lora_r} if mode == "lora" else None
                if stage == "rm":  # pairs of the reward split, as many per step as SFT has rows
                    config = dict(model=model, tokenizer=tok, data=os.path.join(pairs, "reward"),
                                  max_length=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
                                  log_every=1, eval_every=0, save_every=0, lora=lora, dtype=dtype, device="cpu")
                else:
                    config = dict(model=model, tokenizer=tok, data=os.path.join(pairs, "finetune"),
                                  seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.steps,
                                  log_every=1, eval_every=0, eval_batches=1, save_every=0, lora=lora, dtype=dtype,
                                  document_mask=attention == "doc", device="cpu")
                result = run_one(work, f"{stage}-{preset}-{mode}-{dtype}-{attention}", config, args.threads,
                                 stage=stage)
                rows.append(dict(bench=f"{stage}_throughput", stage=stage, preset=preset, mode=mode, dtype=dtype,
                                 document_mask=attention == "doc", params=model_config(preset, vocab).num_params(),
                                 vocab=vocab, tokenizer=tok_note, lora_r=args.lora_r if mode == "lora" else None,
                                 **result, **common(args)))
    return rows


def run_mask(args, work: str, pairs: str, texts: list[str]) -> list[dict]:
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.model.config import ModelConfig
    tok, tok_note = tokenizer_for(ModelConfig.preset(args.mask_preset).vocab_size, texts, work,
                                  args.llama_tokenizer)
    vocab = Tokenizer(tok).vocab_size
    rows = []
    for seed in args.seeds:
        for document_mask in (False, True):
            config = dict(model=args.mask_preset, tokenizer=tok, data=os.path.join(pairs, "finetune"),
                          eval_data=os.path.join(pairs, "evaluation"), seq_len=args.seq_len,
                          batch_size=args.batch_size, max_steps=args.mask_steps, lr=args.mask_lr,
                          min_lr=args.mask_lr / 10, warmup_steps=min(20, args.mask_steps // 10), log_every=1,
                          eval_every=0, eval_batches=10**6, save_every=0, lora=None, seed=seed,
                          document_mask=document_mask, device="cpu")
            name = f"mask-{args.mask_preset}-{'doc' if document_mask else 'cross'}-seed{seed}"
            result = run_one(work, name, config, args.threads, cross_eval=True)
            rows.append(dict(bench="sft_document_mask", preset=args.mask_preset, document_mask=document_mask,
                             seed=seed, steps=args.mask_steps, lr=args.mask_lr,
                             params=model_config(args.mask_preset, vocab).num_params(), vocab=vocab,
                             tokenizer=tok_note, **result, **common(args)))
    return rows


def print_throughput(rows: list[dict]) -> None:
    if not rows:
        return
    head = ["config", "params", "vocab", "s/step", "tok/s", "MFU", "peak RSS"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        mode = f"LoRA r={r['lora_r']}" if r["mode"] == "lora" else "full"
        name = (f"{r.get('stage', 'sft')} {r['preset']} {mode} {r['dtype']}"
                + (" doc-mask" if r["document_mask"] else ""))
        if "error" in r:
            print(f"{name} | failed: {r['error']}")
            continue
        print(" | ".join([name, f"{r['params'] / 1e6:.1f}M", str(r["vocab"]), f"{r['s_per_step']:.3f}",
                          f"{r['tokens_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%", f"{r['peak_rss_gb']:.2f} GB"]))
    for note in {r["tokenizer"] for r in rows if r["tokenizer"] not in ("llama", "synthetic")}:
        print(f"note: tokenizer {note}; LLaMA's tokenizer.model was not found")
    for r in [r for r in rows if "error" not in r][:1]:
        print(f"seq_len {r['seq_len']}, batch {r['batch_size']}, {r['threads']} threads, {r['measured_steps']} "
              "steps measured after a warm-up step; MFU by engine/training/roofline.py (6N full, 4N LoRA, attention "
              "counted) against the peak the run measured; RM rows: pairs per step = batch, max length = seq_len")
    print()


def print_mask(rows: list[dict]) -> None:
    if not rows:
        return
    head = ["attention", "seed", "tok/s", "train loss (last 10)", "eval loss (as trained)",
            "eval loss (doc-masked)", "eval loss (crossing)"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    keys = ("tokens_per_s", "train_loss_last10", "eval_loss", "eval_loss_doc_masked", "eval_loss_crossing")
    for masked in (False, True):
        label = "inside documents" if masked else "crossing documents"
        for r in rows:
            if r["document_mask"] == masked and "error" in r:
                print(f"{label} | {r['seed']} | failed: {r['error']}")
        done = [r for r in rows if r["document_mask"] == masked and "error" not in r]
        mean = [{"seed": "mean", **{k: statistics.mean(r[k] for r in done) for k in keys}}] if len(done) > 1 else []
        for r in done + mean:
            print(" | ".join([label, str(r["seed"]), f"{r['tokens_per_s']:,.0f}", *(f"{r[k]:.4f}" for k in keys[1:])]))
    r = rows[0]
    print(f"{r['preset']} ({r['params'] / 1e6:.2f}M), {r['steps']} steps, seq_len {r['seq_len']}, batch "
          f"{r['batch_size']}, lr {r['lr']}; held-out = the evaluation split")
    pairs = {}
    for r in rows:
        if "error" not in r:
            pairs.setdefault(r["seed"], {})[r["document_mask"]] = r
    pairs = [p for p in pairs.values() if len(p) == 2]
    if pairs:
        print("doc-masked eval loss, (trained inside documents) − (trained crossing), by seed: "
              + ", ".join(f"{p[True]['eval_loss_doc_masked'] - p[False]['eval_loss_doc_masked']:+.4f}" for p in pairs)
              + "; tokens/s inside / crossing: "
              + ", ".join(f"{p[True]['tokens_per_s'] / p[False]['tokens_per_s']:.2f}" for p in pairs))
    print()


if __name__ == "__main__":
    main()
