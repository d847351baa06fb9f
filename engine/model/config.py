"""ModelConfig: the shape of a LLaMA network, with named presets and Hugging Face config.json interop.

Presets follow Meta's released hyper-parameters (LLaMA paper, Table 2; Llama 2 paper, Table 1 and the
params.json files): the FFN hidden size is Meta's `multiple_of` rounding of 8/3·dim, and llama2-70b
uses grouped-query attention with 8 key/value heads.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    dim: int = field(default=4096, metadata={"help": "model (residual stream) width"})
    n_layers: int = field(default=32, metadata={"help": "number of transformer blocks"})
    n_heads: int = field(default=32, metadata={"help": "attention query heads"})
    n_kv_heads: int = field(default=32, metadata={"help": "key/value heads (< n_heads: grouped-query attention)"})
    vocab_size: int = field(default=32000, metadata={"help": "token vocabulary size"})
    hidden_dim: int = field(default=11008, metadata={"help": "SwiGLU feed-forward hidden size"})
    norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    rope_theta: float = field(default=10000.0, metadata={"help": "rotary embedding base"})
    max_seq_len: int = field(default=2048, metadata={"help": "longest sequence the model is meant for"})
    tie_embeddings: bool = field(default=False, metadata={"help": "LM head shares the token embedding"})

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head size dim/n_heads ({self.head_dim}) must be even for rotary embeddings")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + self.dim + (emb if include_embeddings else 0)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **changes) -> "ModelConfig":
        """A named shape, with any field changed (e.g. vocab_size=tok.vocab_size for a preset on another
        tokenizer)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    # ---- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a transformers LlamaConfig (a config.json file, or the folder that holds one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(hf, source=path)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is {model_type!r}; only 'llama' checkpoints are supported")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            if key not in hf:
                raise ValueError(f"{source} is missing required key {key!r}")
        if hf.get("rope_scaling"):
            raise ValueError(f"{source}: rope_scaling {hf['rope_scaling']!r} is not supported (plain RoPE only)")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ValueError(f"{source}: {key}=true is not supported (LLaMA linears have no bias)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * n_heads != hf["hidden_size"]:
            raise ValueError(f"{source}: head_dim {head_dim} × num_attention_heads {n_heads} != hidden_size")
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        try:
            return cls(
                dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=hf["vocab_size"],
                hidden_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta), max_seq_len=hf.get("max_position_embeddings", 2048),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self, dtype: str = "float32") -> dict:
        """A config.json dict that transformers' LlamaForCausalLM reads as this same network."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": None,
            "torch_dtype": dtype,
        }

    def to_dict(self) -> dict:
        return asdict(self)


def _llama1(dim, n_layers, n_heads, hidden_dim):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, hidden_dim=hidden_dim,
                vocab_size=32000, norm_eps=1e-6, max_seq_len=2048)


def _llama2(dim, n_layers, n_heads, hidden_dim, n_kv_heads=None):
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads,
                hidden_dim=hidden_dim, vocab_size=32000, norm_eps=1e-5, max_seq_len=4096)


PRESETS: dict[str, dict] = {
    # For tests: small enough that a forward is microseconds, but with GQA (2 query heads per kv head).
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=512,
                 norm_eps=1e-5, max_seq_len=512),
    # ~0.9M parameters: the demo's from-scratch model (SFT, RM and PPO in minutes on 2 CPU cores).
    "demo": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=512,
                 norm_eps=1e-5, max_seq_len=512),
    # ~58M parameters with LLaMA's 32k vocabulary: the benchmark size that still trains on a laptop CPU.
    "llama-60m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1376, vocab_size=32000,
                      norm_eps=1e-5, max_seq_len=1024),
    "llama-7b": _llama1(4096, 32, 32, 11008),
    "llama-13b": _llama1(5120, 40, 40, 13824),
    "llama-30b": _llama1(6656, 60, 52, 17920),
    "llama-65b": _llama1(8192, 80, 64, 22016),
    "llama2-7b": _llama2(4096, 32, 32, 11008),
    "llama2-13b": _llama2(5120, 40, 40, 13824),
    "llama2-70b": _llama2(8192, 80, 64, 28672, n_kv_heads=8),
}
