"""`train.py tokenizer`: a sentencepiece BPE model on question/answer text, laid out like LLaMA's.

For users without LLaMA's tokenizer and for small from-scratch runs. The options copy LLaMA's
tokenizer.model: BPE, unk 0 / bos 1 / eos 2 and no pad piece (data/tokenizer.py pads with unk),
byte fallback (any UTF-8 text encodes, unknown characters become <0x..> byte pieces), digits split,
no normalisation and whitespace kept as typed, so "\n\nAnswer: " of the prompt template survives a
round trip exactly. Byte fallback reserves 256 pieces, so `vocab_size` must exceed 259 plus the
characters of the corpus.

The corpus is what the models read: "Question: {question}\n\nAnswer: {response_j}" and response_k of
each pair (duplicates dropped), or the lines of .txt files; at most `max_texts` of them, a seeded sample.

Reference: Touvron et al. 2023 (LLaMA), section 2.1; sentencepiece's options.md; llama2.c's
tinystories.py `train_vocab`.
"""
from __future__ import annotations

import io
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.data.tokenizer import format_prompt


@dataclass(frozen=True)
class TokenizerConfig:
    data: tuple[str, ...] = field(default=(), metadata={
        "help": "pairs files, folders or globs (parquet/jsonl, e.g. prepare's --out) or .txt files (a text per line)"})
    vocab_size: int = field(default=8000, metadata={"help": "number of pieces, including 3 specials and 256 bytes"})
    out: str = field(default="tokenizer.model", metadata={"help": "where to write the sentencepiece model"})
    model_type: str = field(default="bpe", metadata={"help": "sentencepiece algorithm", "choices": ("bpe", "unigram")})
    character_coverage: float = field(default=0.99995, metadata={
        "help": "fraction of characters given their own piece; the rarest rest fall back to bytes"})
    max_texts: int = field(default=2_000_000, metadata={"help": "train on a seeded sample of at most this many texts"})
    seed: int = field(default=0, metadata={"help": "seed of that sample"})

    def __post_init__(self):
        if not self.data:
            raise ValueError("tokenizer training needs text (--data PATH [PATH ...])")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size {self.vocab_size} is too small: byte fallback alone takes 259 pieces")
        if self.max_texts < 1:
            raise ValueError(f"max_texts must be at least 1, got {self.max_texts}")


def corpus_texts(sources: Sequence[str]) -> Iterator[str]:
    """Distinct training texts from pairs files (in the SFT template) and .txt files (one per line)."""
    seen: set[int] = set()
    pair_sources = [s for s in sources if not s.endswith(".txt")]
    for path in (s for s in sources if s.endswith(".txt")):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip() and hash(line) not in seen:
                    seen.add(hash(line))
                    yield line.rstrip("\n")
    if pair_sources:
        table = read_pairs(pair_sources, columns=("question", "response_j", "response_k"), min_rows=1)
        for question, better, worse in zip(*(table[c].to_pylist() for c in table.column_names)):
            for text in (format_prompt(question, better), worse):
                if hash(text) not in seen:
                    seen.add(hash(text))
                    yield text


def sample_texts(texts: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k texts in one pass (reservoir sampling), in their original order."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        if i < k:
            reservoir.append((i, text))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                reservoir[j] = (i, text)
    return [text for _, text in sorted(reservoir)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | os.PathLike, *, model_type: str = "bpe",
                    character_coverage: float = 0.99995) -> str:
    """Train a LLaMA-layout sentencepiece model on `texts` and write it to `out` (atomically)."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no text to train a tokenizer on")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            input_sentence_size=0, shuffle_input_sentence=False,  # we sample ourselves, reproducibly
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece cannot train a {vocab_size}-piece {model_type} model on "
                         f"{len(texts)} texts: {str(e).strip()}") from None
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(out + ".tmp", out)
    return out


def run(cfg: TokenizerConfig) -> int:
    """`train.py tokenizer`: train on a seeded sample of the corpus and write the model."""
    started = time.monotonic()
    texts = sample_texts(corpus_texts(cfg.data), cfg.max_texts, cfg.seed)
    if not any(texts):
        raise ValueError(f"{', '.join(cfg.data)}: no text to train a tokenizer on")
    print(f"tokenizer: training a {cfg.vocab_size}-piece {cfg.model_type} model on {len(texts):,} texts "
          f"({sum(map(len, texts)) / 2 ** 20:.1f} MB)", file=sys.stderr, flush=True)
    out = train_tokenizer(texts, cfg.vocab_size, cfg.out, model_type=cfg.model_type,
                          character_coverage=cfg.character_coverage)
    print(f"wrote {out} in {time.monotonic() - started:.1f}s")
    return 0
