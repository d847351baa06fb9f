"""The tokenizer every stage uses, behind one interface, and the one prompt template.

Two kinds of vocabulary: sentencepiece (LLaMA's `tokenizer.model`) and byte-level BPE (GPT-2's scheme, used
by SmolLM2 and most recent models), read from a Hugging Face `tokenizer.json` or from a GGUF file's
metadata. Byte-level BPE runs on Hugging Face `tokenizers`, the ecosystem's reference implementation (Rust,
batched, the same code transformers uses), so ids match transformers' token for token.

Padding: LLaMA's tokenizer has no pad token, and SmolLM2's pads with its eos. We still need *some* id to
put in padded slots of a tensor, so `pad_id` is the tokenizer's pad if it has one distinct from eos,
else unk (else 0). Which slots are padding is always carried by a mask, never inferred from token
values: the pad id is deliberately distinct from eos so that a padded slot never reads as "this row ended".
BOS: added only where the vocabulary's own convention adds it (sentencepiece LLaMA does; a GGUF says
with tokenizer.ggml.add_bos_token, a tokenizer_config.json with add_bos_token).

The tokenizer travels with every checkpoint the engine writes (`save`), so later stages find it
beside the weights (`find_tokenizer`).

Reference: StackLLaMA (TRL examples/research_projects/stack_llama) prompt format
"Question: {question}\n\nAnswer: {answer}"; llama.cpp's pre-tokenizer names (llama-vocab.cpp).
"""
from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm

SENTENCEPIECE, BPE_JSON, BPE_CONFIG = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"
CONTROL = 3  # llama.cpp's token type for special tokens such as <|im_end|>


def format_prompt(question: str, answer: str | None = None) -> str:
    """The StackLLaMA template "Question: {question}\n\nAnswer: {answer}". With no answer it is the query a
    model continues, cut before the space: tokenizers fold that space into the answer's first word
    (sentencepiece's "▁You", byte-level BPE's "ĠThe"), so a query ending in a lone space piece asks the model
    to go on from a token it never saw before an answer (the demo's SFT model then began 40% of its answers
    mid-sentence). Cut there, the query's tokens are a prefix of every full text's."""
    return "Question: " + question + "\n\nAnswer:" + ("" if answer is None else " " + answer)


def encode_answers(tok: "Tokenizer", questions: list[str], answers: list[str]) -> list[list[int]]:
    """Each answer's tokens as they follow its query in the full text (a model's response to it): the full
    text's tokens after the ones it shares with the query."""
    queries = tok.encode_batch([format_prompt(q) for q in questions])
    texts = tok.encode_batch([format_prompt(q, a) for q, a in zip(questions, answers)])
    return [text[shared_prefix(query, text):] for query, text in zip(queries, texts)]


def shared_prefix(prompt: list[int], text: list[int]) -> int:
    """How many leading tokens `text` shares with `prompt`: the prompt's length, or fewer where the
    tokenizer merged the prompt's last piece into the answer (a prompt written by hand, e.g. ending in a space)."""
    n = 0
    while n < min(len(prompt), len(text)) and prompt[n] == text[n]:
        n += 1
    return n


class Tokenizer:
    """`Tokenizer(path)`: a sentencepiece .model, a tokenizer.json, or a .gguf model file."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self.sp = self.bpe = None
        if path.endswith(".json"):
            self.bpe, special = _bpe_from_json(path)
        elif _is_gguf(path):
            self.bpe, special = _bpe_from_gguf(path)
        else:
            self.sp, special = _sentencepiece(path)
        self.vocab_size: int = self.sp.vocab_size() if self.sp else self.bpe.get_vocab_size(with_added_tokens=True)
        self.bos_id: int = special["bos"] if special["add_bos"] and special["bos"] is not None else -1
        self.eos_id: int = -1 if special["eos"] is None else special["eos"]
        if self.eos_id < 0:
            raise ValueError(f"{path}: tokenizer defines no eos token, which generation needs")
        pad, unk = special["pad"], special["unk"]
        self.pad_id: int = pad if pad is not None and pad >= 0 and pad != self.eos_id else max(unk or 0, 0)
        if self.pad_id == self.eos_id:
            raise ValueError(f"{path}: pad id equals eos id ({self.eos_id}); padding would read as end of text")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        if self.sp is not None:
            out = self.sp.EncodeAsIds(texts)
        else:
            out = [e.ids for e in self.bpe.encode_batch(texts, add_special_tokens=False)]
        if bos and self.bos_id >= 0:
            out = [[self.bos_id] + ids for ids in out]
        if eos:
            out = [ids + [self.eos_id] for ids in out]
        return out

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        return self.sp.DecodeIds(ids) if self.sp is not None else self.bpe.decode(ids, skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        """The vocabulary entry itself (sentencepiece's ▁word, byte-level BPE's Ġword)."""
        return self.sp.IdToPiece(int(token_id)) if self.sp is not None else self.bpe.id_to_token(int(token_id))

    def save(self, folder: str) -> None:
        """Write this tokenizer beside a checkpoint: tokenizer.model, or tokenizer.json + tokenizer_config.json
        (the latter also loads in transformers as a fast tokenizer)."""
        if self.sp is not None:
            shutil.copyfile(self.path, os.path.join(folder, SENTENCEPIECE))
            return
        self.bpe.save(os.path.join(folder, BPE_JSON))
        name = self.bpe.id_to_token
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.bos_id >= 0,
                  "bos_token": name(self.bos_id) if self.bos_id >= 0 else None, "eos_token": name(self.eos_id),
                  "pad_token": name(self.pad_id), "clean_up_tokenization_spaces": False}
        with open(os.path.join(folder, BPE_CONFIG), "w") as f:
            json.dump(config, f, indent=2)

    def check_model_vocab(self, model_vocab_size: int, model_name: str = "the model") -> None:
        """Token ids index the embedding table, so the two sizes must agree exactly."""
        if self.vocab_size != model_vocab_size:
            raise ValueError(
                f"vocab size mismatch: tokenizer {self.path} has {self.vocab_size} tokens but "
                f"{model_name} has vocab_size {model_vocab_size}"
            )


def find_tokenizer(model: str) -> str | None:
    """The tokenizer that travels with a checkpoint: a GGUF file carries its own; a folder holds
    tokenizer.model or tokenizer.json."""
    if os.path.isfile(model):
        return model if _is_gguf(model) else None
    for name in (SENTENCEPIECE, BPE_JSON):
        if os.path.isfile(os.path.join(model, name)):
            return os.path.join(model, name)
    return None


# ---- the three sources ------------------------------------------------------------------------------

def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _sentencepiece(path: str):
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
    ids = {name: getattr(sp, f"{name}_id")() for name in ("bos", "eos", "pad", "unk")}
    return sp, {**{k: (v if v >= 0 else None) for k, v in ids.items()}, "add_bos": True}


def _bpe_from_json(path: str):
    from tokenizers import Tokenizer as BPE

    try:
        bpe = BPE.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception type with the parser's message
        raise ValueError(f"{path}: not a tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    config_path = os.path.join(os.path.dirname(path), BPE_CONFIG)
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)

    def token_id(key):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return bpe.token_to_id(token) if token is not None else None
    return bpe, {"bos": token_id("bos_token"), "eos": token_id("eos_token"), "pad": token_id("pad_token"),
                 "unk": token_id("unk_token"), "add_bos": bool(config.get("add_bos_token", False))}


# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name: how the text is cut before the merges, which
# must be how the merges were learned. GPT-2's default is the ByteLevel pre-tokenizer's own regex.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str, path: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if name in ("default", "gpt2", "gpt-2"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":  # llama.cpp's smollm: each digit alone, then GPT-2's regex
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in ("llama3", "llama-v3", "llama-bpe"):
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{path}: GGUF pre-tokenizer {name!r} is not supported (known: default, gpt2, smollm, llama3); "
                     "pass a tokenizer.json with --tokenizer")


def _bpe_from_gguf(path: str):
    import gguf
    from tokenizers import AddedToken, Tokenizer as BPE, decoders, models

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

    def get(key, default=None):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        return field.contents() if field is not None else default
    kind = get("model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer {kind!r}; only byte-level BPE ('gpt2') is read from GGUF here "
                         "(pass --tokenizer with the model's tokenizer.model or tokenizer.json)")
    tokens, merges, types = get("tokens"), get("merges"), get("token_type", [])
    if not tokens or not merges:
        raise ValueError(f"{path}: GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    bpe = BPE(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                         merges=[tuple(m.split(" ", 1)) for m in merges]))
    bpe.pre_tokenizer = _pre_tokenizer(get("pre", "default"), path)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    special = {name: get(f"{key}_token_id") for name, key in
               (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    return bpe, {**{k: (int(v) if v is not None else None) for k, v in special.items()},
                 "add_bos": bool(get("add_bos_token", False))}
