"""Checkpoint interop: transformers both ways, Meta's consolidated.*.pth, llama2.c's .bin; bad files."""
import json
import math
import os
import struct

import pytest
import torch

from rlhf_engine.engine.weights.hf_folder import CheckpointError, save_model_folder

from rlhf_engine.engine.weights.load import load_checkpoint
from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.llama import LLaMA

transformers = pytest.importorskip("transformers")

GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, hidden_dim=96, norm_eps=1e-5,
                  rope_theta=500.0, max_seq_len=64)
MHA = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=101, hidden_dim=80, max_seq_len=64)


def make(cfg, head="lm", seed=0):
    return LLaMA(cfg, head=head).init_weights(generator=torch.Generator().manual_seed(seed)).eval()


def hf_model(cfg, cls=None):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    torch.manual_seed(0)
    return (cls or transformers.LlamaForCausalLM)(hf_cfg).eval()


TOKENS = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
def test_transformers_folder_loads_with_same_logits(tmp_path, cfg):
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path)
    ours = load_checkpoint(str(tmp_path)).eval()
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("shard_bytes", [2**30, 20_000], ids=["single", "sharded"])
def test_our_folder_loads_in_transformers_with_same_logits(tmp_path, cfg, shard_bytes):
    ours = make(cfg)
    save_model_folder(ours, str(tmp_path / "ckpt"), max_shard_bytes=shard_bytes)
    files = os.listdir(tmp_path / "ckpt")
    assert ("model.safetensors.index.json" in files) == (shard_bytes < 2**30)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    mask = torch.ones_like(TOKENS)
    mask[0, :4] = 0
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-5
        diff = (ours(TOKENS, attention_mask=mask) - hf(TOKENS, attention_mask=mask).logits)[mask.bool()]
        assert diff.abs().max().item() <= 1e-5
    reloaded = load_checkpoint(str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reloaded.state_dict().values()))


def test_tied_embeddings_round_trip_through_transformers(tmp_path):
    cfg = ModelConfig(**{**GQA.to_dict(), "tie_embeddings": True})
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_checkpoint(str(tmp_path / "hf"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        assert (ours(TOKENS) - hf(TOKENS).logits).abs().max().item() <= 1e-5
    save_model_folder(ours, str(tmp_path / "ours"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(TOKENS).logits - hf(TOKENS).logits).abs().max().item() <= 1e-5


def test_score_head_is_a_transformers_sequence_classifier(tmp_path):
    ours = make(GQA, head="score")
    save_model_folder(ours, str(tmp_path), pad_token_id=0)
    hf = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    tokens = TOKENS.clamp(min=1)  # no pad id inside: transformers scores the last non-pad token
    with torch.no_grad():
        assert (ours(tokens)[:, -1] - hf(tokens).logits[:, 0]).abs().max().item() <= 1e-5


def test_causal_lm_loads_as_reward_model_with_a_fresh_head(tmp_path):
    save_model_folder(make(GQA), str(tmp_path))
    rm = load_checkpoint(str(tmp_path), head="score")
    assert rm.score.weight.shape == (1, 64) and torch.isfinite(rm(TOKENS)).all()


# ---- Meta's original format ---------------------------------------------------------------------

def unpermute(w, n_heads):
    """Split-half rows back to Meta's interleaved rotary layout (inverse of permute_rotary)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_meta(model):
    cfg, sd = model.cfg, model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(cfg.head_dim // 2)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out.update({
            f"layers.{i}.attention.wq.weight": unpermute(sd[p + "self_attn.q_proj.weight"], cfg.n_heads),
            f"layers.{i}.attention.wk.weight": unpermute(sd[p + "self_attn.k_proj.weight"], cfg.n_kv_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    return out


def meta_reference_forward(w, cfg, tokens):
    """Meta's llama/model.py forward, restated: interleaved complex rotary, no padding."""
    T, hd = tokens.shape[1], cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # x [B, T, H, hd], pairs (2i, 2i+1) rotate as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None]).flatten(3)

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * g

    h = w["tok_embeddings.weight"][tokens]
    B = tokens.shape[0]
    for i in range(cfg.n_layers):
        L = lambda n: w[f"layers.{i}.{n}.weight"]  # noqa: E731
        x = norm(h, L("attention_norm"))
        q = rope((x @ L("attention.wq").T).view(B, T, cfg.n_heads, hd))
        k = rope((x @ L("attention.wk").T).view(B, T, cfg.n_kv_heads, hd))
        v = (x @ L("attention.wv").T).view(B, T, cfg.n_kv_heads, hd)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        scores = scores + torch.full((T, T), float("-inf")).triu(1)
        att = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, -1)
        h = h + att @ L("attention.wo").T
        x = norm(h, L("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ L("feed_forward.w1").T) * (x @ L("feed_forward.w3").T)) \
            @ L("feed_forward.w2").T
    return norm(h, w["norm.weight"]) @ w["output.weight"].T


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_consolidated_checkpoint_imports(tmp_path, n_shards):
    ours = make(GQA, seed=5)
    meta = to_meta(ours)
    with torch.no_grad():  # the permutation is right iff Meta's interleaved forward agrees with ours
        assert (meta_reference_forward(meta, GQA, TOKENS) - ours(TOKENS)).abs().max().item() <= 1e-5
    # Model-parallel shards: column-parallel weights split rows, row-parallel (wo, w2) and the
    # embedding split columns, norms replicated.
    row_split = ("wq", "wk", "wv", "w1", "w3", "output")
    for s in range(n_shards):
        shard = {}
        for name, t in meta.items():
            if t.dim() == 1:
                shard[name] = t
            else:
                dim = 0 if any(f"{k}." in name for k in row_split) else 1
                shard[name] = t.chunk(n_shards, dim=dim)[s].clone()
        torch.save(shard, tmp_path / f"consolidated.{s:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, norm_eps=1e-5,
        rope_theta=500.0, ffn_dim_multiplier=0.5)))
    loaded = load_checkpoint(str(tmp_path)).eval()
    assert loaded.cfg.hidden_dim == 96 and loaded.cfg.vocab_size == 101  # int(0.5·170)=85 rounded up to 96; vocab -1 read off the embedding
    with torch.no_grad():
        assert (loaded(TOKENS) - ours(TOKENS)).abs().max().item() <= 1e-5


class Evil:  # any non-tensor object: a weights-only load must refuse to build it
    pass


def test_meta_loader_refuses_pickled_objects(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": Evil()}, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(dict(dim=64, n_layers=1, n_heads=4)))
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth holds objects that are not plain tensors "
                                              r"\(such as test_checkpoint\.Evil\); it will not be loaded") as e:
        load_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


# ---- llama2.c legacy .bin -----------------------------------------------------------------------

def write_llama2c(model, path, shared=True):
    cfg, sd = model.cfg, model.state_dict()
    layer = lambda name: [sd[f"model.layers.{i}.{name}"] for i in range(cfg.n_layers)]  # noqa: E731
    parts = [sd["model.embed_tokens.weight"], *layer("input_layernorm.weight"),
             *[unpermute(w, cfg.n_heads) for w in layer("self_attn.q_proj.weight")],
             *[unpermute(w, cfg.n_kv_heads) for w in layer("self_attn.k_proj.weight")],
             *layer("self_attn.v_proj.weight"), *layer("self_attn.o_proj.weight"),
             *layer("post_attention_layernorm.weight"), *layer("mlp.gate_proj.weight"),
             *layer("mlp.down_proj.weight"), *layer("mlp.up_proj.weight"), sd["model.norm.weight"],
             torch.zeros(cfg.max_seq_len, cfg.head_dim // 2), torch.zeros(cfg.max_seq_len, cfg.head_dim // 2)]
    if not shared:
        parts.append(sd["lm_head.weight"])
    vocab = cfg.vocab_size if shared else -cfg.vocab_size
    with open(path, "wb") as f:
        f.write(struct.pack("7i", cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, vocab,
                            cfg.max_seq_len))
        for t in parts:
            f.write(t.contiguous().float().numpy().tobytes())


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_bin_imports(tmp_path, shared):
    cfg = ModelConfig(**{**GQA.to_dict(), "tie_embeddings": shared, "rope_theta": 10000.0})
    ours = make(cfg, seed=7)
    write_llama2c(ours, tmp_path / "model.bin", shared)
    loaded = load_checkpoint(str(tmp_path / "model.bin")).eval()
    assert loaded.cfg == cfg
    with torch.no_grad():
        assert (loaded(TOKENS) - ours(TOKENS)).abs().max().item() <= 1e-5


def test_llama2c_truncated_bin_is_a_clear_error(tmp_path):
    write_llama2c(make(GQA), tmp_path / "model.bin")
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="model.bin: .* bytes, but a llama2.c legacy export"):
        load_checkpoint(str(tmp_path / "model.bin"))


# ---- bad inputs and atomic writes ---------------------------------------------------------------

def test_missing_config_key(tmp_path):
    save_model_folder(make(GQA), str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json is missing required key 'num_hidden_layers'"):
        load_checkpoint(str(tmp_path))


def test_wrong_tensor_shape_names_file_and_tensor(tmp_path):
    save_model_folder(make(GQA), str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight "
                                              r"has shape \[64, 96\] but the config implies \[64, 128\]"):
        load_checkpoint(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    save_model_folder(make(GQA), str(tmp_path))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable safetensors file"):
        load_checkpoint(str(tmp_path))


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    save_model_folder(make(GQA), str(tmp_path))
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*model.norm.weight"):
        load_checkpoint(str(tmp_path))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nope"))


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    first = make(GQA, seed=1)
    save_model_folder(first, str(target))
    import rlhf_engine.engine.weights.hf_folder as ck

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "write_json", crash)  # dies after the tensors are written
    with pytest.raises(OSError, match="disk full"):
        save_model_folder(make(GQA, seed=2), str(target))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folder left behind
    loaded = load_checkpoint(str(target))
    assert torch.equal(loaded.lm_head.weight, first.lm_head.weight)


def test_killed_save_never_looks_complete(tmp_path):
    """SIGKILL in the middle of a save: the target name never appears half-written."""
    import signal
    import subprocess
    import sys
    import time
    code = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "import train\nimport rlhf_engine.engine.weights.hf_folder as ck\n"
        "from rlhf_engine.engine.model.llama import LLaMA\nfrom rlhf_engine.engine.model.config import ModelConfig\n"
        "orig = ck.save_tensors\n"
        "def slow(*a, **k):\n    orig(*a, **k); print('written', flush=True); import time; time.sleep(60)\n"
        "ck.save_tensors = slow\n"
        "ck.save_model_folder(LLaMA(ModelConfig.preset('tiny')), %r)\n"
    ) % (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), str(tmp_path / "ckpt"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    assert not (tmp_path / "ckpt").exists()
    assert all(name.startswith(".ckpt.tmp-") for name in os.listdir(tmp_path))


# ---- the real stories260K checkpoint (optional development data) ---------------------------------

def test_stories260k_greedy_text():
    from conftest import shared_file

    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.model.generate import SamplingConfig, generate
    model = load_checkpoint(shared_file("tinyllamas-stories260K", "stories260K.bin")).eval()
    tok = Tokenizer(shared_file("tinyllamas-stories260K", "tok512.model"))
    out = generate(model, [[tok.bos_id]], SamplingConfig(max_new_tokens=64, temperature=0), tok.eos_id, tok.pad_id)
    assert out.response_tokens[0, :15].tolist() == [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421,
                                                     395, 317, 426]
    assert tok.decode(out.response_tokens[0].tolist()).startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")
