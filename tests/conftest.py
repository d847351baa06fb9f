"""Shared fixtures: a tiny sentencepiece tokenizer trained on the spot, and paths to optional real data."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")

WORDS = ("how do i store coffee beans the best way is an airtight container keep them away from light "
         "why does my bike chain skip gears you need to adjust the derailleur cable tension question answer "
         "what is a good tokenizer for small models byte pair encoding works well thanks").split()


# What CI ran against: the test extra tracks the newest releases, so a red run names what moved.
REPORTED = ("torch", "transformers", "peft", "numpy", "pyarrow", "sentencepiece", "safetensors", "tensorboard",
            "bitsandbytes", "matplotlib", "tokenizers", "gguf", "kernels")


def pytest_report_header(config):
    from importlib import metadata
    found = []
    for name in REPORTED:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return "resolved: " + ", ".join(found)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test, excluded by default (run with -m slow)")


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """A 300-token BPE sentencepiece model with LLaMA's special ids (unk 0, bos 1, eos 2, no pad)."""
    import random

    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    text = folder / "text.txt"
    text.write_text("\n".join(lines))
    spm.SentencePieceTrainer.Train(
        input=str(text), model_prefix=str(folder / "tok"), vocab_size=300, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        minloglevel=2)
    return str(folder / "tok.model")


def shared_file(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"optional development data not present: {path}")
    return path


@pytest.fixture(scope="session")
def synthetic_pairs(tmp_path_factory):
    """The demo's synthetic StackExchange site through the real pipeline: (pairs folder, tokenizer path)."""
    from rlhf_engine.data.prepare import PrepareConfig, prepare
    from rlhf_engine.data.synthetic import write_synthetic_posts
    from rlhf_engine.data.train_tokenizer import corpus_texts, train_tokenizer
    folder = tmp_path_factory.mktemp("synthetic")
    posts = write_synthetic_posts(folder / "site" / "Posts.xml", 600, seed=0)
    prepare(PrepareConfig(out=str(folder / "pairs"), posts=(str(posts),), progress_seconds=1e9))
    tok = train_tokenizer(corpus_texts([str(folder / "pairs")]), 512, folder / "tok.model")
    return str(folder / "pairs"), str(tok)


@pytest.fixture(scope="session")
def ppo_base(synthetic_pairs, tmp_path_factory):
    """(base folder, rl split) for PPO tests: a random tiny LLaMA (std 0.15, so logits are expressive)
    saved with the synthetic tokenizer."""
    import torch

    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.llama import LLaMA
    pairs, tok = synthetic_pairs
    cfg = ModelConfig.preset("tiny", vocab_size=512)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ppo_base")
    save_model_folder(LLaMA(cfg).init_weights(std=0.15), str(folder), tokenizer=tok)
    return str(folder), os.path.join(pairs, "rl")


@pytest.fixture(scope="session")
def random_rm(ppo_base, synthetic_pairs, tmp_path_factory):
    """A reward model made from the PPO base with a random score head (a merged RM folder)."""
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    from rlhf_engine.engine.weights.load import load_checkpoint
    folder = str(tmp_path_factory.mktemp("random_rm") / "rm")
    save_model_folder(load_checkpoint(ppo_base[0], head="score"), folder, tokenizer=synthetic_pairs[1],
                      pad_token_id=0)
    return folder


def read_metrics(out_dir, key):
    """{step: value} of one scalar from a run's metrics.jsonl."""
    import json
    values = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if key in row:
                values[row["step"]] = row[key]
    return values
