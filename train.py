#!/usr/bin/env python3
"""The one entry point: `python train.py STAGE --flags`, or `torchrun --nproc_per_node=N train.py STAGE ...`.

Each stage lives in its own module; this file only builds the command line and turns the errors a
user can cause (bad flags, bad files) into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout without installing

from engine.flags import add_config_flags, config_from_args  # noqa: E402

# ---- generate -----------------------------------------------------------------------------------

def add_generate_args(p: argparse.ArgumentParser):
    from engine.generate import SamplingConfig
    p.add_argument("--model", required=True,
                   help="checkpoint: HF folder, Meta folder (params.json + consolidated.*.pth) or llama2.c .bin")
    p.add_argument("--adapter", help="LoRA adapter folder (ours or PEFT's) to apply to the model")
    p.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: the one beside the checkpoint)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat the flag for a batch (default: one empty prompt)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default: fp32)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_config_flags(p, SamplingConfig, group="sampling")


def run_generate(args) -> int:
    import torch

    from engine.builder import DTYPES, resolve_tokenizer
    from engine.checkpoint import load_checkpoint
    from engine.generate import SamplingConfig, generate

    sampling = config_from_args(SamplingConfig, args)
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"no checkpoint at {args.model}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = resolve_tokenizer(args.model, args.tokenizer)
    model = load_checkpoint(args.model, dtype=DTYPES[args.dtype], device=device).eval()
    tok.check_model_vocab(model.cfg.vocab_size, args.model)
    if args.adapter:
        from engine.lora import load_adapter
        load_adapter(model, args.adapter)
        model.eval()
    prompts = args.prompt or [""]
    out = generate(model, [tok.encode(p, bos=True) for p in prompts], sampling, tok.eos_id, tok.pad_id)
    for i in range(len(prompts)):
        ids = out.response_tokens[i][out.response_mask[i].bool()].tolist()
        if ids and ids[-1] == tok.eos_id:
            ids = ids[:-1]
        print(tok.decode(ids), flush=True)
    return 0


# ---- demo ---------------------------------------------------------------------------------------

def add_demo_args(p: argparse.ArgumentParser):
    p.add_argument("--out", default=None, help="run folder (default: a fresh runs/demo-DATE-TIME)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--ppo-steps", type=int, default=50, help="PPO steps (default: 50)")


def run_demo(args) -> int:
    from engine.demo import run
    return run(args.out, args.seed, args.ppo_steps)


# ---- training stages: flags generated from each stage's config dataclass -------------------------

def training_stage(module: str, config: str):
    """(add_args, run) for a stage module exposing `train(cfg, dist)` and a frozen config class."""
    import importlib

    def add_args(p):
        add_config_flags(p, getattr(importlib.import_module(module), config), group="options")

    def run(args) -> int:
        from engine.dist import close_dist, init_dist
        mod = importlib.import_module(module)
        cfg = config_from_args(getattr(mod, config), args)
        dist = init_dist(cfg.device)
        try:
            mod.train(cfg, dist)
        finally:
            close_dist(dist)
        return 0
    return add_args, run


def data_stage(module: str):
    import importlib
    return (lambda p: importlib.import_module(module).add_args(p),
            lambda args: importlib.import_module(module).run(args))


STAGES = {
    # name: (help, add_args, run)
    "generate": ("sample text from a checkpoint", add_generate_args, run_generate),
    "demo": ("run the whole pipeline on built-in synthetic data with a tiny model", add_demo_args, run_demo),
    "prepare": ("StackExchange Posts.xml dumps -> preference-pair splits (parquet)", *data_stage("data.prepare")),
    "tokenizer": ("train a sentencepiece BPE tokenizer on question/answer text", *data_stage("data.train_tokenizer")),
    "sft": ("supervised fine-tuning on questions and their best answers", *training_stage("engine.sft", "SFTConfig")),
    "rm": ("train a reward model on answer pairs", *training_stage("engine.rm", "RMConfig")),
    "merge": ("merge LoRA adapters into a full checkpoint", *data_stage("engine.merge")),
    "ppo": ("PPO against a reward model with a per-token KL penalty", *training_stage("engine.ppo", "PPOConfig")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description="StackLLaMA-style RLHF in raw PyTorch: one stage per subcommand.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_text, add_args, run) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if add_args:
            add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # Errors a user can cause (bad flags, files, configs) are one line; bugs keep their traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
