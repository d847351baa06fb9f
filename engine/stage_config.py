"""Fields every training stage shares (model, output, optimisation, LoRA, precision, resume).

Each stage's frozen config (SFTConfig, RMConfig, PPOConfig) extends this one with its own fields and
re-declares the fields whose default differs (StackLLaMA used different LoRA ranks and learning
rates per stage). train.py turns every field into a flag; the field's help is the flag's help.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.lora import LoRAConfig


@dataclass(frozen=True)
class StageConfig:
    model: str = field(default=None, metadata={"help": "base checkpoint (HF/Meta folder, llama2.c .bin) or a "
                                                       "preset name for a random init (e.g. tiny)"})
    out: str = field(default=None, metadata={"help": "output folder (checkpoints, tb logs, metrics.jsonl)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model (default: beside --model)"})
    seed: int = field(default=0, metadata={"help": "random seed (init, data order, dropout, sampling)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep: int = field(default=3, metadata={"help": "keep the newest N checkpoints"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    lora: bool = field(default=True, metadata={"help": "train LoRA adapters on a frozen base (--no-lora: "
                                                       "full fine-tuning)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (update scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "layers to adapt, or "
                                                                                          "all-linear"})
    load_in_8bit: bool = field(default=False, metadata={"help": "store the frozen base in 8 bits"})
    dtype: str = field(default="fp32", metadata={"help": "compute dtype", "choices": ["fp32", "bf16"]})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'auto' for the newest in "
                                                               "--out"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many consecutive NaN/Inf steps"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})

    def __post_init__(self):
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        for name in ("log_every", "keep", "max_bad_steps"):
            require_positive(self, name)
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.lora:
            self.lora_config()  # validates r, alpha, dropout, targets

    def lora_config(self) -> LoRAConfig | None:
        return LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets) if self.lora else None


def require_positive(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
