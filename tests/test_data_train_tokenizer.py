"""Tokenizer training (data/train_tokenizer.py): LLaMA's layout, exact round trips, determinism, errors."""

import pytest

from rlhf_engine.data.prepare import PrepareConfig, prepare
from rlhf_engine.data.synthetic import write_synthetic_posts
from rlhf_engine.data.tokenizer import Tokenizer, format_prompt
from rlhf_engine.data.train_tokenizer import TokenizerConfig, corpus_texts, sample_texts, train_tokenizer


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    posts = write_synthetic_posts(root / "site" / "Posts.xml", n_questions=150, seed=0)
    prepare(PrepareConfig(out=str(root / "pairs"), posts=(posts,), progress_seconds=1e9))
    return root / "pairs"


@pytest.fixture(scope="module")
def model_path(pairs_dir, tmp_path_factory):
    return train_tokenizer(corpus_texts([str(pairs_dir)]), 600, tmp_path_factory.mktemp("m") / "tokenizer.model")


def test_llama_special_layout_and_byte_fallback(model_path):
    tok = Tokenizer(model_path)
    assert tok.vocab_size == 600
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.sp.pad_id()) == (0, 1, 2, -1)
    assert tok.pad_id == 0  # no pad piece, as in LLaMA: data/tokenizer.py pads with unk
    assert [tok.sp.id_to_piece(i) for i in (3, 4, 258)] == ["<0x00>", "<0x01>", "<0xFF>"]


@pytest.mark.parametrize("text", [
    format_prompt("How do I fix the chain?", "You should clean the chain every week.\n\n1. First, dry it."),
    "unseen: \u65e5\u672c \u2603 caf\u00e9 \U0001f37a",  # characters never seen in training, via bytes
    "  two leading spaces,\ttabs and trailing  ",
    "digits 20240131 split one by one",
])
def test_round_trip_is_exact(model_path, text):
    tok = Tokenizer(model_path)
    assert tok.decode(tok.encode(text)) == text


def test_template_pieces_are_learned(model_path):
    tok = Tokenizer(model_path)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("Question: x\n\nAnswer: y")]
    assert "\u2581Question" in pieces and "Answer" in pieces
    assert not any(p.startswith("<0x") for p in pieces)
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("2024")]
    assert len(digits) == 5 and digits[0] == "\u2581"  # split_digits: one piece (or byte) per digit


def test_training_is_deterministic(pairs_dir, model_path, tmp_path):
    again = train_tokenizer(corpus_texts([str(pairs_dir)]), 600, tmp_path / "again.model")
    assert open(again, "rb").read() == open(model_path, "rb").read()


def test_corpus_is_distinct_templated_texts_and_txt_lines(pairs_dir, tmp_path):
    texts = list(corpus_texts([str(pairs_dir)]))
    assert len(texts) == len(set(texts)) and texts[0].startswith("Question: ")
    txt = tmp_path / "extra.txt"
    txt.write_text("one line\n\nanother line\none line\n")
    assert list(corpus_texts([str(txt)])) == ["one line", "another line"]


def test_sample_texts_keeps_order_and_is_seeded():
    texts = [str(i) for i in range(1000)]
    sample = sample_texts(texts, 10, seed=1)
    assert len(sample) == 10 and sample == sorted(sample, key=int)
    assert sample == sample_texts(texts, 10, seed=1) != sample_texts(texts, 10, seed=2)
    assert sample_texts(texts[:5], 10, seed=1) == texts[:5]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="too small: byte fallback alone takes 259 pieces"):
        TokenizerConfig(data=("x",), vocab_size=100)
    with pytest.raises(ValueError, match="needs text"):
        TokenizerConfig()
    with pytest.raises(ValueError, match="no text to train"):
        train_tokenizer(["", ""], 300, tmp_path / "t.model")
    many_chars = ["".join(chr(0x4E00 + (i * 7 + j) % 400) for j in range(20)) for i in range(200)]
    with pytest.raises(ValueError, match="cannot train a 300-piece bpe model on 200 texts"):
        train_tokenizer(many_chars, 300, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


def cli(argv):
    """`train.py tokenizer ARGV` in this process."""
    import train
    return train.main(["tokenizer", *argv])


def test_cli(pairs_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "tok.model"
    assert cli(["--data", str(pairs_dir / "finetune"), str(pairs_dir / "rl"), "--vocab-size", "400",
                "--out", str(out)]) == 0
    assert Tokenizer(out).vocab_size == 400
    assert "training a 400-piece bpe model" in capsys.readouterr().err
    assert cli(["--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such file or folder"
