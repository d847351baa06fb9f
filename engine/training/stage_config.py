"""Fields the training stages share, so each is declared once.

`StageConfig` holds what SFT, RM and PPO all read (model, output, optimiser, LoRA, precision, resume);
`ScheduledStageConfig` adds what only SFT and RM read (a learning-rate schedule, torch.compile). Each
stage's frozen config extends one of them with its own fields and re-declares the fields whose default
differs (StackLLaMA used different LoRA ranks and learning rates per stage). train.py turns every
field into a flag (engine/flags.py), so a stage's `--help` lists exactly the fields of its config,
and tests/test_flags.py checks that the stage reads every one of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_engine.engine.model.config import PRESETS
from rlhf_engine.engine.model.lora import LoRAConfig


@dataclass(frozen=True)
class StageConfig:
    model: str = field(default=None, metadata={"help": "base checkpoint (HF/Meta folder, GGUF file, llama2.c .bin) "
                                                       "or a preset for a random init: " + ", ".join(PRESETS)})
    out: str = field(default=None, metadata={"help": "output folder (checkpoints, tb logs, metrics.jsonl)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model or tokenizer.json "
                                                                "(default: the one beside --model, or a GGUF's own)"})
    seed: int = field(default=0, metadata={"help": "random seed (init, data order, dropout, sampling)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep: int = field(default=3, metadata={"help": "keep the newest N checkpoints"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    lora: LoRAConfig | None = field(default=LoRAConfig(), metadata={
        "help": "train LoRA adapters on a frozen base (--no-lora: full fine-tuning)", "prefix": "lora_"})
    load_in_8bit: bool = field(default=False, metadata={"help": "store the frozen base in 8 bits"})
    dtype: str = field(default="fp32", metadata={"help": "compute dtype", "choices": ["fp32", "bf16"]})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'auto' for the newest in "
                                                               "--out"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many consecutive NaN/Inf steps"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})

    def __post_init__(self):
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        require_positive(self, "log_every", "keep", "max_bad_steps")
        require_non_negative(self, "save_every", "grad_clip", "weight_decay")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class ScheduledStageConfig(StageConfig):
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})

    def __post_init__(self):
        super().__post_init__()
        require_non_negative(self, "warmup_steps")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= --min-lr <= --lr, got lr={self.lr}, min_lr={self.min_lr}")


def require_positive(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")


def require_non_negative(cfg, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
