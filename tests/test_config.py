"""ModelConfig presets, validation and Hugging Face config.json round trips."""
import json

import pytest

from rlhf_engine.engine.model.config import PRESETS, ModelConfig


def test_presets_match_published_parameter_counts():
    # LLaMA-7B has 6,738,415,616 parameters (HF model card / the paper's "6.7B").
    assert ModelConfig.preset("llama-7b").num_params() == 6_738_415_616
    # Llama-2-70B: 68,976,648,192 with 8 kv heads (grouped-query attention).
    big = ModelConfig.preset("llama2-70b")
    assert (big.n_heads, big.n_kv_heads) == (64, 8)
    assert big.num_params() == 68_976_648_192
    assert ModelConfig.preset("llama-13b").num_params() == 13_015_864_320
    assert 55e6 < ModelConfig.preset("llama-60m").num_params() < 65e6
    assert set(PRESETS) >= {"tiny", "llama-7b", "llama-13b", "llama-30b", "llama-65b",
                            "llama2-7b", "llama2-13b", "llama2-70b"}


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown model preset 'llama-8b'.*tiny"):
        ModelConfig.preset("llama-8b")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=0), "dim must be a positive integer"),
    (dict(dim=100, n_heads=3, n_kv_heads=3), "divisible by n_heads"),
    (dict(n_heads=32, n_kv_heads=5), "multiple of n_kv_heads"),
    (dict(dim=96, n_heads=32, n_kv_heads=32), "must be even"),
    (dict(norm_eps=0.0), "norm_eps must be > 0"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
])
def test_invalid_values_raise_one_clear_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_is_frozen():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(Exception):
        cfg.dim = 128


def test_hf_round_trip(tmp_path):
    cfg = ModelConfig.preset("llama2-70b")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf()))
    assert ModelConfig.from_hf(path) == cfg
    assert ModelConfig.from_hf(tmp_path) == cfg  # a folder works too


def test_from_hf_reads_a_transformers_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                                  intermediate_size=100, vocab_size=321, rms_norm_eps=1e-5, rope_theta=5e5,
                                  max_position_embeddings=300, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg == ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=321, hidden_dim=100,
                              norm_eps=1e-5, rope_theta=5e5, max_seq_len=300, tie_embeddings=True)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("hidden_size"), "missing required key 'hidden_size'"),
    (lambda d: d.update(model_type="mistral"), "only 'llama'"),
    (lambda d: d.update(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (lambda d: d.update(num_key_value_heads=3), "multiple of n_kv_heads"),
])
def test_from_hf_rejects_bad_configs(tmp_path, edit, match):
    d = ModelConfig.preset("tiny").to_hf()
    edit(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(tmp_path)
