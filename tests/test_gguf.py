"""GGUF checkpoints and byte-level BPE tokenizers: tiny files written here with gguf-py's writer, and the
real SmolLM2-135M-Instruct file (skipped without ../shared) against transformers' own GGUF loader."""
import dataclasses
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from rlhf_engine.data.tokenizer import Tokenizer  # noqa: E402
from rlhf_engine.engine.model.config import ModelConfig  # noqa: E402
from rlhf_engine.engine.model.llama import LLaMA  # noqa: E402
from rlhf_engine.engine.weights.hf_folder import CheckpointError  # noqa: E402
from rlhf_engine.engine.weights.load import detect_format, load_checkpoint  # noqa: E402

from conftest import SHARED  # noqa: E402

Q = gguf.GGMLQuantizationType
SMOLLM = os.path.join(SHARED, "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=128, norm_eps=1e-5,
                   rope_theta=10000.0, max_seq_len=128, tie_embeddings=True)
# One storage type per kind of tensor, so that one tiny file covers all six types the issue names.
TYPES = {"token_embd": Q.F16, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.BF16,
         "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F32}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's split-half rotary rows -> llama.cpp's interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model: LLaMA, types: dict | None, tokenizer: dict | None = None, tied: bool = True):
    """`model` as llama.cpp's converter writes it; types None stores everything as F32.
    Returns {HF name: the tensor a reader should produce} (quantisation round trip, un-permuted)."""
    cfg = model.cfg
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for key, value in (tokenizer or {}).items():
        getattr(writer, f"add_{key}")(value)
    expected = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        w = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname, kind = "token_embd.weight", "token_embd"
        elif name == "model.norm.weight":
            gname, kind = "output_norm.weight", None
        elif name == "lm_head.weight":
            gname, kind = "output.weight", None
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            part = rest.rsplit(".", 1)[0]
            gname, kind = f"blk.{layer}.{GGUF_NAMES[part]}.weight", GGUF_NAMES[part]
            if part == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg.n_heads)
            elif part == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg.n_kv_heads)
        qtype = (types or {}).get(kind, Q.F32) if w.ndim == 2 else Q.F32
        stored = gguf.quants.quantize(w, qtype)
        writer.add_tensor(gname, stored, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        back = torch.from_numpy(gguf.quants.dequantize(stored, qtype).astype(np.float32).reshape(w.shape))
        if kind in ("attn_q", "attn_k"):  # the reader's answer: the round trip, rows back in HF's order
            heads = cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads
            back = back.view(heads, back.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(back.shape)
        expected[name] = back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def tiny_model(cfg=TINY) -> LLaMA:
    return LLaMA(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()


def test_an_f32_gguf_gives_back_the_model_exactly(tmp_path):
    """All F32: every tensor, and so the logits, equal the model written; q/k rows (GQA: k has 2 heads
    against q's 4) come back from llama.cpp's interleaved order, and the missing output.weight ties."""
    model = tiny_model()
    write_gguf(tmp_path / "m.gguf", model, types=None)
    assert detect_format(str(tmp_path / "m.gguf")) == "gguf"
    loaded = load_checkpoint(str(tmp_path / "m.gguf")).eval()
    assert loaded.cfg == TINY
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(tokens), model(tokens))


def test_each_quantised_type_dequantises_as_gguf_py_does(tmp_path):
    """F16, BF16, Q8_0, Q4_0, Q4_1 in one file: each tensor equals gguf-py's own dequantisation of what was
    stored (q/k un-permuted), and the logits stay near the float model's (4-bit error, not a layout error)."""
    model = tiny_model()
    expected = write_gguf(tmp_path / "q.gguf", model, TYPES)
    loaded = load_checkpoint(str(tmp_path / "q.gguf"), dtype=torch.float32).eval()
    state = loaded.state_dict()
    for name, t in expected.items():
        assert torch.equal(state[name], t), name
    tokens = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    want, got = torch.log_softmax(model(tokens), -1), torch.log_softmax(loaded(tokens), -1)
    # KL per position: 0.068 measured with these 4-bit weights; 1.58 with k's rows left in llama.cpp's order
    assert (want.exp() * (want - got)).sum(-1).mean() < 0.3


def test_an_untied_gguf_keeps_its_output_and_8bit_loads_it(tmp_path):
    cfg = ModelConfig(**{**TINY.to_dict(), "tie_embeddings": False})
    model = tiny_model(cfg)
    write_gguf(tmp_path / "u.gguf", model, types=None, tied=False)
    loaded = load_checkpoint(str(tmp_path / "u.gguf"))
    assert not loaded.cfg.tie_embeddings and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    from rlhf_engine.engine.model.int8 import Int8Linear, quantize_on_load
    eight = load_checkpoint(str(tmp_path / "u.gguf"), transform=quantize_on_load).eval()
    assert isinstance(eight.model.layers[0].self_attn.q_proj, Int8Linear)
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    assert (eight(tokens) - model(tokens)).abs().max() < 0.1 * model(tokens).abs().max()


def test_bad_gguf_files_are_one_line_errors(tmp_path):
    wrong_arch = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(wrong_arch), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'"):
        load_checkpoint(str(wrong_arch))
    cut = tmp_path / "cut.gguf"
    write_gguf(cut, tiny_model(), types=None)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_checkpoint(str(cut))


# ---- byte-level BPE from GGUF metadata ----------------------------------------------------------------

BYTES = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "0", "1", "2", "Ċ"]


def bpe_metadata(pre="smollm", add_bos=False):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + BYTES + ["he", "ll", "hell", "Ġw", "Ġwo"]
    merges = ["h e", "l l", "he ll", "Ġ w", "Ġw o"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {"tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_merges": merges,
            "token_types": types, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0,
            "add_bos_token": add_bos}


def test_gguf_bpe_tokenizer_by_hand(tmp_path):
    """Vocabulary: 3 control tokens, then a..z (ids 3..28), Ġ 29, 0 30, 1 31, 2 32, Ċ 33, he 34, ll 35,
    hell 36, Ġw 37, Ġwo 38. "hello world" -> hell·o | Ġwo·r·l·d (merges in rank order); "hello 12" under
    smollm's pre-tokenizer splits each digit off, so the space stands alone (Ġ) before 1 and 2."""
    cfg = dataclasses.replace(TINY, vocab_size=39)
    write_gguf(tmp_path / "t.gguf", tiny_model(cfg), types=None, tokenizer=bpe_metadata())
    tok = Tokenizer(tmp_path / "t.gguf")
    o, r, d = 3 + ord("o") - ord("a"), 3 + ord("r") - ord("a"), 3 + ord("d") - ord("a")
    assert tok.encode("hello world") == [36, o, 38, r, 3 + ord("l") - ord("a"), d]
    assert tok.encode("hello 12") == [36, o, 29, 31, 32]
    assert tok.encode("hi<|im_end|>") == [3 + ord("h") - ord("a"), 3 + ord("i") - ord("a"), 2]  # kept whole
    assert tok.decode(tok.encode("hello world\n")) == "hello world\n"
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (2, 0, -1)  # pad = eos in the file -> unk; no BOS added
    assert tok.encode("hi", bos=True) == tok.encode("hi")
    tok.check_model_vocab(39)
    assert Tokenizer(write_tokenizer_only(tmp_path, bpe_metadata(add_bos=True))).encode("hi", bos=True)[0] == 1
    # It travels with checkpoints: tokenizer.json + tokenizer_config.json, read back the same.
    folder = tmp_path / "saved"
    folder.mkdir()
    tok.save(str(folder))
    again = Tokenizer(folder / "tokenizer.json")
    assert again.encode("hello 12 world") == tok.encode("hello 12 world")
    assert (again.eos_id, again.pad_id, again.bos_id) == (2, 0, -1)


def write_tokenizer_only(tmp_path, metadata) -> str:
    cfg = dataclasses.replace(TINY, vocab_size=39)
    path = tmp_path / "bos.gguf"
    write_gguf(path, tiny_model(cfg), types=None, tokenizer=metadata)
    return str(path)


def test_an_unknown_pre_tokenizer_is_refused(tmp_path):
    path = tmp_path / "p.gguf"
    cfg = dataclasses.replace(TINY, vocab_size=39)
    write_gguf(path, tiny_model(cfg), types=None, tokenizer=bpe_metadata(pre="mystery"))
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        Tokenizer(path)


# ---- the real model against transformers ----------------------------------------------------------

real = pytest.mark.skipif(not os.path.exists(SMOLLM), reason="SmolLM2 GGUF not in ../shared/data")
PROMPTS = ["Question: How should I store coffee beans?\n\nAnswer: The best way",
           "Question: Why does my bike chain skip gears?\n\nAnswer:",
           "The capital of France is",
           "def fibonacci(n):\n    "]


@pytest.fixture(scope="module")
def smollm_pair():
    transformers = pytest.importorskip("transformers")
    ours = load_checkpoint(SMOLLM, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(SMOLLM), gguf_file=os.path.basename(SMOLLM), dtype=torch.float32).eval()
    return ours, theirs, Tokenizer(SMOLLM)


@real
def test_smollm_config_logits_and_greedy_tokens_match_transformers(smollm_pair):
    from rlhf_engine.engine.model.generate import SamplingConfig, generate
    ours, theirs, tok = smollm_pair
    assert (ours.cfg.n_layers, ours.cfg.dim, ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.hidden_dim,
            ours.cfg.vocab_size, ours.cfg.rope_theta, ours.cfg.tie_embeddings) == (30, 576, 9, 3, 1536, 49152,
                                                                                   1e5, True)
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4, prompt
    ids = tok.encode(PROMPTS[0])
    out = generate(ours, [ids], SamplingConfig(temperature=0.0, max_new_tokens=64), eos_id=NEVER,
                   pad_id=tok.pad_id)
    mine = out.response_tokens[0][out.response_mask[0].bool()].tolist()
    ref = hf_greedy(theirs, ids, tok)
    assert mine == ref and len(mine) == 64
    assert "cool" in tok.decode(mine) and "dark" in tok.decode(mine)  # SOURCE.md's continuation


# Greedy continuations run the full 64 tokens on both sides: the stop token is set to one neither model
# produces here (the last id), so pure argmax decides every step (SmolLM2 ends this answer at token 41).
NEVER = 49151


def hf_greedy(model, ids: list[int], tok, n: int = 64) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=NEVER,
                             pad_token_id=tok.pad_id)
    return out[0, len(ids):].tolist()


@real
def test_a_merged_checkpoint_the_engine_writes_loads_in_transformers(smollm_pair, tmp_path):
    """LoRA on q/v with non-zero adapters, merged and saved as train.py merge does: transformers reads the
    folder (tied head, tokenizer beside it) and computes the same logits and greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from rlhf_engine.engine.model.lora import LoRAConfig, adapter_parameters, apply_lora, merge_and_unload
    from rlhf_engine.engine.weights.hf_folder import save_model_folder
    ours, _, tok = smollm_pair
    model = load_checkpoint(SMOLLM, dtype=torch.float32).eval()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj")))
    g = torch.Generator().manual_seed(0)
    for p in adapter_parameters(model):
        p.data = torch.randn(p.shape, generator=g) * 0.02
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    with torch.no_grad():
        adapted = model(ids)
    merge_and_unload(model)
    out = save_model_folder(model, str(tmp_path / "merged"), tokenizer=tok)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings
    with torch.no_grad():
        # float32 on both sides, but ours multiplies through oneDNN (kernels/linear.py), transformers through
        # MKL: the sums' order differs, ~1e-4 on logits up to ~18 after 30 layers (6e-6 relative)
        assert (hf(ids).logits - adapted).abs().max() < 3e-4
        assert (hf(ids).logits - ours(ids)).abs().max() > 1e-3  # the adapters changed something
        reloaded = load_checkpoint(out).eval()
        assert torch.equal(reloaded(ids), model(ids))
    greedy = hf_greedy(hf, ids[0].tolist(), tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(PROMPTS[0], add_special_tokens=False).input_ids == tok.encode(PROMPTS[0])
    from rlhf_engine.engine.model.generate import SamplingConfig, generate
    mine = generate(reloaded, [ids[0].tolist()], SamplingConfig(temperature=0.0, max_new_tokens=64),
                    eos_id=NEVER, pad_id=tok.pad_id)
    assert mine.response_tokens[0][mine.response_mask[0].bool()].tolist() == greedy and len(greedy) == 64


def dump_texts(*sites) -> list[str]:
    from rlhf_engine.data.stackexchange import Question, html_to_markdown, iter_posts, question_text
    texts = []
    for site in sites:
        for post in iter_posts(os.path.join(SHARED, site, "Posts.xml")):
            body = html_to_markdown(post.body)
            texts.append(question_text(post.title, body) if isinstance(post, Question) else body)
    return texts


@real
def test_smollm_tokenizer_matches_transformers_on_two_dumps():
    """Every question and answer of two shared dumps, as prepare writes them (Markdown), token for token
    against transformers' GGUF tokenizer, once its pre-tokenizer is the one the file names: transformers
    5.25 ignores tokenizer.ggml.pre = smollm and keeps GPT-2's regex, which differs from llama.cpp's smollm
    pre-tokenizer (digits split off first) only on whitespace before a digit ("\\n  40g": ĊĠĠ·4 here and in
    llama.cpp, ĊĠ·Ġ4 there); that case is asserted by hand in test_gguf_bpe_tokenizer_by_hand's "hello 12"."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers as pt
    tok = Tokenizer(SMOLLM)
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM), gguf_file=os.path.basename(SMOLLM))
    hf.backend_tokenizer.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                                      pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = dump_texts("se-coffee", "se-beer")
    assert len(texts) > 2000
    ours = tok.encode_batch(texts)
    theirs = hf(texts, add_special_tokens=False).input_ids
    assert [i for i in range(len(texts)) if ours[i] != theirs[i]] == []
    assert all(tok.decode(ids) == hf.decode(ids) == text for ids, text in zip(ours[:500], texts[:500]))
