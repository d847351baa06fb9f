"""Pieces the benchmarks share: synthetic-data tokenizers, random base checkpoints, JSON-line output."""
from __future__ import annotations

import argparse
import json
import os

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


def random_base_checkpoint(cfg, tok_path: str, folder: str) -> str:
    """Save a randomly initialised LLaMA of config `cfg` with the tokenizer, once (reused if present)."""
    import torch

    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.model.llama import LLaMA
    if not os.path.isdir(folder):
        model = LLaMA(cfg).init_weights(generator=torch.Generator().manual_seed(0))
        save_model_folder(model, folder, tokenizer=tok_path)
    return folder


def emit_json(rows: list[dict], path: str | None) -> None:
    """Print one JSON line per row, and append them to `path` if given."""
    for row in rows:
        line = json.dumps(row)
        print(line)
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")


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
