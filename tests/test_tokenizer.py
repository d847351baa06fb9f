"""Tokenizer wrapper: special ids, padding never mistaken for eos, the prompt template, vocab checks."""
import pytest

from rlhf_engine.data.tokenizer import Tokenizer, encode_answers, format_prompt


def test_special_ids_and_pad_distinct_from_eos(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (300, 1, 2)
    assert tok.sp.pad_id() == -1  # like LLaMA: no pad token in the model file
    assert tok.pad_id == 0 and tok.pad_id != tok.eos_id


def test_encode_decode_round_trip(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    text = "how do i store coffee beans? Zebra 42 ü"  # unseen characters go through byte fallback
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "answer"], bos=True) == [tok.encode(text, bos=True), tok.encode("answer", bos=True)]


def test_prompt_template():
    assert format_prompt("Why?", "Because.") == "Question: Why?\n\nAnswer: Because."
    assert format_prompt("Why?") == "Question: Why?\n\nAnswer:"  # the query: the space goes with the answer
    assert format_prompt("Why?", "") == "Question: Why?\n\nAnswer: "


def demo_tokenizer(synthetic_pairs):
    return Tokenizer(synthetic_pairs[1])


def llama_tokenizer(_):
    from conftest import shared_file
    return Tokenizer(shared_file("llama-tokenizer", "tokenizer.model"))


def smollm2_tokenizer(_):
    from conftest import shared_file
    return Tokenizer(shared_file("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.parametrize("load", [demo_tokenizer, llama_tokenizer, smollm2_tokenizer])
def test_query_tokens_are_a_prefix_of_every_full_text(load, synthetic_pairs):
    """A model answers the query's tokens, so they must be the start of the texts it learnt from; the old
    template's trailing space is not: every one of these tokenizers folds it into the answer's first word."""
    tok = load(synthetic_pairs)
    question = "How do I fix the chain?\n\nI use my chain every week."
    for answer in ("You should clean the chain every week.", "The best way is to oil it.", "1. First, dry it.",
                   "```\noil --chain\n```", "\n\nHope this helps!"):
        query = tok.encode(format_prompt(question), bos=True)
        full = tok.encode(format_prompt(question, answer), bos=True)
        assert full[:len(query)] == query, answer
        assert encode_answers(tok, [question], [answer]) == [full[len(query):]]
        assert tok.decode(query + encode_answers(tok, [question], [answer])[0]).endswith("Answer: " + answer)
    spaced = tok.encode(format_prompt(question) + " ", bos=True)  # the old query, ending in its lone space piece
    full = tok.encode(format_prompt(question, "You should clean the chain every week."), bos=True)
    assert full[:len(spaced)] != spaced


def test_vocab_mismatch_is_a_clear_error(tiny_tokenizer_path):
    tok = Tokenizer(tiny_tokenizer_path)
    tok.check_model_vocab(300)
    with pytest.raises(ValueError, match=r"vocab size mismatch: tokenizer .*tok.model has 300 tokens but ckpt has "
                                         r"vocab_size 32000"):
        tok.check_model_vocab(32000, "ckpt")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="bad.model is not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


def test_llama_tokenizer_reference_ids():
    from conftest import shared_file
    tok = Tokenizer(shared_file("llama-tokenizer", "tokenizer.model"))
    text = format_prompt("How do I store coffee beans?", "In an airtight container.")
    # Ids recorded in shared/data/llama-tokenizer/SOURCE.md.
    assert tok.encode(text) == [894, 29901, 1128, 437, 306, 3787, 26935, 367, 550, 29973, 13, 13, 22550, 29901,
                                512, 385, 263, 2728, 523, 5639, 29889]
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (32000, 0, 2)
