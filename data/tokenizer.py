"""SentencePiece tokenizer wrapper and the one prompt template every stage uses.

LLaMA's tokenizer has no pad token (pad_id() == -1). We still need *some* id to put in padded slots
of a tensor, so `pad_id` is the tokenizer's pad if it has one, else unk (0). Which slots are padding
is always carried by a mask, never inferred from token values: the pad id is deliberately distinct
from eos so that a padded slot can never be read as "this row ended".

Reference: StackLLaMA (TRL examples/research_projects/stack_llama) prompt format
"Question: {question}\n\nAnswer: {answer}".
"""
from __future__ import annotations

import os

import sentencepiece as spm

def format_prompt(question: str, answer: str = "") -> str:
    """The StackLLaMA template; with no answer it is the PPO query that the policy continues."""
    return "Question: " + question + "\n\nAnswer: " + answer


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{path}: tokenizer defines no eos token, which generation needs")
        pad = self.sp.pad_id()
        self.pad_id: int = pad if pad >= 0 else max(self.sp.unk_id(), 0)
        if self.pad_id == self.eos_id:
            raise ValueError(f"{path}: pad id equals eos id ({self.eos_id}); padding would read as end of text")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self.sp.EncodeAsIds(texts)
        if bos and self.bos_id >= 0:
            out = [[self.bos_id] + ids for ids in out]
        if eos:
            out = [ids + [self.eos_id] for ids in out]
        return out

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def check_model_vocab(self, model_vocab_size: int, model_name: str = "the model") -> None:
        """Token ids index the embedding table, so the two sizes must agree exactly."""
        if self.vocab_size != model_vocab_size:
            raise ValueError(
                f"vocab size mismatch: tokenizer {self.path} has {self.vocab_size} tokens but "
                f"{model_name} has vocab_size {model_vocab_size}"
            )
