"""Pieces the benchmarks share: synthetic pairs, their tokenizers, random base checkpoints, a best-of timer,
JSON-line output, variants in fresh processes and what a step keeps for backward."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FALLBACK_VOCAB = 1000  # about the most pieces sentencepiece can learn from the synthetic text


def tokenizer_for(vocab_size: int, texts: list[str], work: str, llama_tokenizer: str) -> tuple[str, str]:
    """(tokenizer.model path, a note saying which) for a preset's vocabulary size."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.data.train_tokenizer import train_tokenizer
    if os.path.exists(llama_tokenizer) and Tokenizer(llama_tokenizer).vocab_size == vocab_size:
        return llama_tokenizer, "llama"
    path = os.path.join(work, f"tok{vocab_size}.model")
    try:
        return (path if os.path.exists(path) else train_tokenizer(texts, vocab_size, path)), "synthetic"
    except ValueError:
        path = os.path.join(work, f"tok{FALLBACK_VOCAB}.model")
        note = f"synthetic {FALLBACK_VOCAB} (fallback: no {vocab_size}-piece tokenizer)"
        return (path if os.path.exists(path) else train_tokenizer(texts, FALLBACK_VOCAB, path)), note


def synthetic_pairs(work: str, posts: int, text_split: str | None = None) -> tuple[str, list[str]]:
    """`train.py prepare` of `posts` synthetic Stack Exchange posts into work/pairs, once (reused if present);
    returns (the pairs folder, the texts to train a tokenizer on: every split's, or `text_split`'s)."""
    from rlhf_engine.data.prepare import PrepareConfig, prepare
    from rlhf_engine.data.synthetic import write_synthetic_posts
    from rlhf_engine.data.train_tokenizer import corpus_texts
    pairs = os.path.join(work, "pairs")
    if not os.path.exists(os.path.join(pairs, "summary.json")):
        written = write_synthetic_posts(os.path.join(work, "site", "Posts.xml"), posts, seed=0)
        prepare(PrepareConfig(out=pairs, posts=(written,), progress_seconds=1e9))
    return pairs, list(corpus_texts([os.path.join(pairs, text_split) if text_split else pairs]))


def preset_base_checkpoint(preset: str, tok_path: str, work: str) -> str:
    """A randomly initialised LLaMA of the preset's shape and the tokenizer's vocabulary, saved as HF, once."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.model.config import ModelConfig
    vocab = Tokenizer(tok_path).vocab_size
    return random_base_checkpoint(ModelConfig.preset(preset, vocab_size=vocab), tok_path,
                                  os.path.join(work, f"{preset}-v{vocab}-base"))


def best_time(fn, repeats: int, clock=time.perf_counter) -> float:
    """The fastest of `repeats` calls after one warm-up call (first-call allocations, kernel selection):
    other jobs on the shared cores only ever add time."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def random_base_checkpoint(cfg, tok_path: str, folder: str) -> str:
    """Save a randomly initialised LLaMA of config `cfg` with the tokenizer, once (reused if present)."""
    import torch

    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.model.llama import LLaMA
    if not os.path.isdir(folder):
        model = LLaMA(cfg).init_weights(generator=torch.Generator().manual_seed(0))
        save_model_folder(model, folder, tokenizer=tok_path)
    return folder


def length_range(ap: argparse.ArgumentParser, text: str, flag: str = "--response-length") -> tuple[int, int]:
    """(min, max) from "N" or "MIN-MAX"; anything else, or MIN > MAX, is the parser's one-line error."""
    bounds = text.split("-", 1)
    if not all(x.isdigit() for x in bounds) or int(bounds[0]) > int(bounds[-1]):
        ap.error(f"{flag} {text!r}: expected N or MIN-MAX")
    return int(bounds[0]), int(bounds[-1])


def emit_json(rows: list[dict], path: str | None) -> None:
    """Print one JSON line per row, and append them to `path` if given."""
    for row in rows:
        line = json.dumps(row)
        print(line)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")


def variants_in_fresh_processes(script: str, flags: list[str], names) -> list[dict]:
    """Run `script *flags --variant=NAME` for each name, each in a fresh Python process (so each one's peak RSS
    is its own), and return the JSON object each printed last."""
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, script, *flags, f"--variant={name}"], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def kept_peak_and_time(step, weight_ptrs: set, repeats: int = 5) -> dict:
    """What one forward + backward `step()` keeps and costs: runs it once under a saved-tensors hook that counts
    the bytes of the distinct storages autograd holds for backward (tensors whose data_ptr is in weight_ptrs
    excluded), reads the process's peak RSS rise over that run (getrusage), then times `repeats` more runs."""
    import resource

    import torch
    kept: dict = {}

    def pack(t):
        if t.data_ptr() not in weight_ptrs:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"kept_mib": round(sum(kept.values()) / 2**20, 1),
            "peak_mib_above_inputs": round((peak_kib - base_kib) / 1024, 1), "seconds": round(min(times), 4),
            "threads": torch.get_num_threads()}


def run_worker(spec_path: str, fn) -> None:
    """Child side of a one-configuration-per-process benchmark: fn(spec) -> result dict, written to
    spec["result"]; a failure is written there too (the parent shows it in its table) and re-raised."""
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = fn(spec)
    except Exception as e:
        with open(spec["result"], "w") as f:
            json.dump({"error": f"{type(e).__name__}: {e}"}, f)
        raise
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def add_run_args(ap: argparse.ArgumentParser, llama_tokenizer: str) -> None:
    """Flags of the benchmarks that run each configuration in its own process."""
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default; on a "
                    "busy machine 1 avoids OpenMP threads waiting on each other)")
    ap.add_argument("--llama-tokenizer", default=llama_tokenizer, help="used for 32000-vocabulary presets")
    ap.add_argument("--workdir", help="scratch folder (kept, and reused by later runs); default: a temp folder")
    ap.add_argument("--json", help="append the JSON lines to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration from a spec file
