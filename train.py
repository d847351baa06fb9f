#!/usr/bin/env python3
"""The one entry point: `python train.py STAGE --flags`, or `torchrun --nproc_per_node=N train.py STAGE ...`.

Every stage is registered the same way: a loader that imports the stage's module and returns its
frozen config class and the function that runs it. The stage's flags are generated from the config
(engine/flags.py), so `train.py STAGE --help` lists exactly the fields the stage reads. A stage's
modules are imported only when that stage is asked for, so `train.py --help` stays fast. Errors a
user can cause (bad flags, bad files) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Callable, NamedTuple


def use_checkout(root: str) -> None:
    """Import `rlhf_engine` from the checkout at `root` (engine/, kernels/, data/ are its subpackages).

    The project's one import name is `rlhf_engine`: setup.py installs the three folders under it, so no
    top-level name of ours lands in site-packages (Hugging Face's `kernels` package owns that name), and
    kernels/ has no __init__.py, so a script started in the repository root still imports their `kernels`.
    Started from a checkout, train.py binds the name to its own folder: the code that runs is the code
    beside it, installed or not, even when another copy is installed. Once bound, the name stays bound.
    """
    if "rlhf_engine" in sys.modules:
        return
    spec = importlib.util.spec_from_loader("rlhf_engine", loader=None, is_package=True)
    spec.submodule_search_locations = [root]
    sys.modules["rlhf_engine"] = importlib.util.module_from_spec(spec)


HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isdir(os.path.join(HERE, "engine")):  # a checkout; the installed script uses the installed package
    use_checkout(HERE)

from rlhf_engine.engine.flags import add_config_flags, config_from_args  # noqa: E402


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag is named on one line, with where to look, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class Stage(NamedTuple):
    help: str
    load: Callable[[], tuple[type, Callable]]  # -> (config class, run(cfg) -> exit code)


def on_dist(train: Callable) -> Callable:
    """run(cfg) for a training stage `train(cfg, dist)`: join the torchrun process group around it."""
    def run(cfg) -> int:
        from rlhf_engine.engine.training.dist import close_dist, init_dist
        dist = init_dist(cfg.device)
        try:
            train(cfg, dist)
        finally:
            close_dist(dist)
        return 0
    return run


def _prepare():
    from rlhf_engine.data import prepare
    return prepare.PrepareConfig, prepare.run


def _tokenizer():
    from rlhf_engine.data import train_tokenizer
    return train_tokenizer.TokenizerConfig, train_tokenizer.run


def _sft():
    from rlhf_engine.engine import sft
    return sft.SFTConfig, on_dist(sft.train)


def _rm():
    from rlhf_engine.engine import rm
    return rm.RMConfig, on_dist(rm.train)


def _dpo():
    from rlhf_engine.engine import dpo
    return dpo.DPOConfig, on_dist(dpo.train)


def _merge():
    from rlhf_engine.engine import merge
    return merge.MergeConfig, merge.run


def _ppo():
    from rlhf_engine.engine import ppo
    return ppo.PPOConfig, on_dist(ppo.train)


def _eval():
    from rlhf_engine.engine import evaluate
    return evaluate.EvalConfig, on_dist(evaluate.evaluate)


def _generate():
    from rlhf_engine.engine import generate_text
    return generate_text.GenerateConfig, generate_text.run


def _check():
    from rlhf_engine.engine import check
    return check.CheckConfig, check.run


def _demo():
    from rlhf_engine.engine import demo
    return demo.DemoConfig, demo.run


STAGES = {
    "demo": Stage("run the whole pipeline on built-in synthetic data with a tiny model", _demo),
    "prepare": Stage("StackExchange Posts.xml dumps -> preference-pair splits (parquet)", _prepare),
    "tokenizer": Stage("train a sentencepiece BPE tokenizer on question/answer text", _tokenizer),
    "sft": Stage("supervised fine-tuning on questions and their best answers", _sft),
    "rm": Stage("train a reward model on answer pairs", _rm),
    "dpo": Stage("direct preference optimisation on answer pairs (no reward model, no sampling)", _dpo),
    "merge": Stage("merge LoRA adapters into a full checkpoint", _merge),
    "ppo": Stage("PPO against a reward model with a per-token KL penalty", _ppo),
    "eval": Stage("compare models' answers to held-out questions under reward-model judges", _eval),
    "generate": Stage("sample text from a checkpoint", _generate),
    "check": Stage("run the engine's invariants on your checkpoint, data and device", _check),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The command line; only `stage`'s flags are built (importing its modules), the others are listed."""
    parser = Parser(
        prog="train.py", description="StackLLaMA-style RLHF in raw PyTorch: one stage per subcommand.")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, entry in STAGES.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help, add_help=name != stage)
        if name == stage:
            config_cls, run = entry.load()
            add_config_flags(p, config_cls)
            p.set_defaults(config_cls=config_cls, run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stage = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(stage if stage in STAGES else None).parse_args(argv)
    try:
        cfg = config_from_args(args.config_cls, args)
        return args.run(cfg) or 0
    except (ValueError, OSError) as e:
        # Errors a user can cause (bad flags, files, configs) are one line; bugs keep their traceback. One
        # write call, newline included: ranks under torchrun share the pipe, and print()'s separate write of
        # the newline let two ranks' lines run together when stderr is unbuffered.
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
