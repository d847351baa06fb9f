"""`train.py check`: the engine's invariants (engine/rl/invariants.py) on your checkpoint, data and device.

The first command to run on a new machine or GPU, and the answer to "is my run on-policy?": it loads
the policy as PPO does (the checkpoint, plus --adapter as a LoRA adapter, in --dtype, optionally 8-bit),
samples as PPO samples and scores as the PPO update scores, on a few real prompts (questions from
--data, else built-in ones), and prints one row per invariant: what it measured, the tolerance, PASS or
FAIL. The exit code is 1 when any row fails. Small by design (a few prompts, a few new tokens): it runs
in seconds on a small model.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import torch

from rlhf_engine.data.pairs_io import pair_files, read_pairs
from rlhf_engine.data.tokenizer import Tokenizer, format_prompt
from rlhf_engine.engine.weights.adapters import is_adapter_folder, read_adapter_base
from rlhf_engine.engine.weights.builder import load_model, resolve_tokenizer
from rlhf_engine.engine.model.generate import SamplingConfig, left_pad
from rlhf_engine.engine.rl.invariants import (INT8_TOLERANCE, Invariant, cache_matches_full_forward, disabled_equals_base,
                                              int8_matches_reference, log_softmax, logprob_tolerance,
                                              padding_invariance,
                                              reward_reads_last_real_token, rm_padding_invariance, sample_and_score,
                                              sampler_logprobs_match, sampler_runs_trainers_adapter,
                                              splits_share_no_question)
from rlhf_engine.engine.model.lora import disable_lora
from rlhf_engine.engine.rl.reward import load_reward_network, reward_model_fn
from rlhf_engine.engine.training.train_state import row_seed
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.kernels.int8_matmul import default_impl


@dataclass(frozen=True)
class CheckConfig:
    model: str = field(default=None, metadata={"help": "checkpoint folder (e.g. a `train.py sft` checkpoint)"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder on --model (PEFT layout), "
                                                              "e.g. a `train.py ppo` checkpoint-NNNNNN"})
    reward_model: str | None = field(default=None, metadata={"help": "reward model: a merged folder or an RM "
                                                                   "adapter folder, as `train.py ppo` takes"})
    data: str | None = field(default=None, metadata={"help": "pairs file or folder (a `train.py prepare` output: "
                                                           "its splits are also checked for shared questions)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer.model or tokenizer.json (default: "
                                                                  "beside --model, or a GGUF's own)"})
    dtype: str = field(default="fp32", metadata={"help": "compute dtype", "choices": ["fp32", "bf16"]})
    load_in_8bit: bool = field(default=False, metadata={"help": "store the frozen base in 8 bits, as PPO would"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if available)"})
    seed: int = field(default=0, metadata={"help": "random seed of the sampler"})
    prompts: int = field(default=4, metadata={"help": "how many prompts (and pairs) to test on"})
    max_new_tokens: int = field(default=8, metadata={"help": "tokens generated per prompt"})

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required")
        for name in ("prompts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


# Built-in prompts and pairs when no --data is given (question, better answer, worse answer).
BUILT_IN = (
    ("How do I store coffee beans?", "Keep them in an airtight container away from light.", "In the fridge."),
    ("Why does my bike chain skip gears?", "The derailleur cable tension needs adjusting.", "Bikes do that."),
    ("What is a good tokenizer for small models?", "Byte pair encoding works well.", "Any of them."),
    ("How do I undo the last git commit?", "git reset --soft HEAD~1 keeps your changes staged.", "Delete .git."),
)
# The invariants are about numbers, not content: short rows keep the check to seconds.
PROMPT_TOKENS, PAIR_TOKENS = 48, 64


def split_folders(data: str) -> dict[str, str]:
    """{name: folder} of the subfolders of `data` that hold pairs files (a `prepare` output's splits)."""
    if not os.path.isdir(data):
        return {}
    folders = {name: os.path.join(data, name) for name in sorted(os.listdir(data))}
    return {name: path for name, path in folders.items() if os.path.isdir(path) and (
        glob.glob(os.path.join(glob.escape(path), "**", "*.parquet"), recursive=True)
        or glob.glob(os.path.join(glob.escape(path), "**", "*.jsonl"), recursive=True))}


def read_rows(data: str | None, n: int) -> tuple[list[tuple[str, str, str]], str]:
    """n (question, response_j, response_k) rows from the first file of --data's rl split (PPO's
    prompts; else its first split, else --data itself), or the built-in rows; and where they came from."""
    if not data:
        return [BUILT_IN[i % len(BUILT_IN)] for i in range(n)], "built-in prompts"
    splits = split_folders(data)
    source = pair_files(splits.get("rl") or next(iter(splits.values()), data))[0]
    table = read_pairs(source, columns=("question", "response_j", "response_k")).slice(0, n).to_pydict()
    if not table["question"]:
        raise ValueError(f"{source}: no pairs to take prompts from")
    return list(zip(table["question"], table["response_j"], table["response_k"])), f"prompts from {source}"


@torch.no_grad()
def base_logprobs(cfg: CheckConfig, tok: Tokenizer, device: torch.device, tokens, attention_mask) -> torch.Tensor:
    """Log-probs [B, T, V] of --model loaded alone (no adapter), stored as the LoRA policy's base is."""
    base = load_model(cfg.model, tok, dtype=cfg.dtype, device=device, load_in_8bit=cfg.load_in_8bit)
    with autocast(device, cfg.dtype):
        return log_softmax(base(tokens, attention_mask=attention_mask))


def capped(ids: list[int], cap: int) -> list[int]:
    """At most `cap` tokens: the first (BOS) and the last cap - 1 (the prompt's end, "Answer:")."""
    return ids if len(ids) <= cap else ids[:1] + ids[len(ids) - cap + 1:]


def format_table(results: list[Invariant]) -> str:
    header = ("invariant", "measured", "tolerance", "result")
    rows = [(r.name, f"{r.measured:.3g}", f"{r.tolerance:.3g}", "PASS" if r.passed else "FAIL") for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(cfg: CheckConfig) -> int:
    """`train.py check`: print the invariants' table; 1 if any fails."""
    for flag, path in (("model", cfg.model), ("adapter", cfg.adapter), ("reward-model", cfg.reward_model),
                       ("data", cfg.data)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag} {path}: no such file or folder")
    if is_adapter_folder(cfg.model):
        raise ValueError(f"--model {cfg.model} is a LoRA adapter: pass it as --adapter, and its base "
                         f"({read_adapter_base(cfg.model) or 'the checkpoint it was trained on'}) as --model")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    logprob_tol = logprob_tolerance(device, cfg.dtype, cfg.load_in_8bit)  # one forward computed two ways
    decode_tol = logprob_tolerance(device, cfg.dtype, cfg.load_in_8bit, decode=True)  # PPO's on-policy warning's bar
    tok = resolve_tokenizer(cfg.model, cfg.tokenizer)
    rows, source = read_rows(cfg.data, cfg.prompts)
    eight_bit = f"on (kernel {default_impl(device)})" if cfg.load_in_8bit else "off"
    print(f"check: device {device}, dtype {cfg.dtype}, 8-bit {eight_bit}; {len(rows)} {source}", flush=True)

    results: list[Invariant] = []
    prompt_lists = tok.encode_batch([format_prompt(q) for q, _, _ in rows], bos=True)
    if cfg.adapter:  # the reference comes first, so the base and the policy are never in memory together
        base_tokens, base_mask = left_pad([capped(ids, PROMPT_TOKENS) for ids in prompt_lists], tok.pad_id, device)
        reference = base_logprobs(cfg, tok, device, base_tokens, base_mask)
    # The policy as PPO holds it (base in --dtype or 8-bit, float32 adapter beside it), loaded as eval loads it.
    policy = load_model(cfg.model, tok, adapter=cfg.adapter, dtype=cfg.dtype, device=device,
                        load_in_8bit=cfg.load_in_8bit)
    cap = min(PROMPT_TOKENS, policy.cfg.max_seq_len - cfg.max_new_tokens - 8)  # room for generation and padding
    if cap < 2:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_len {policy.cfg.max_seq_len}")
    prompts = [capped(ids, cap) for ids in prompt_lists]

    # 1. padding, 2. the KV cache
    results += padding_invariance(policy, prompts, tok.pad_id, cfg.dtype, logprob_tol)
    results.append(cache_matches_full_forward(policy, prompts, cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                                              cfg.dtype, decode_tol))
    # 3. sampler = trainer, as PPO samples (temperature 1, a seed per row); 4. the adapter in each
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed)
    row_seeds = [row_seed(cfg.seed, i) for i in range(len(prompts))]

    def sample():
        return sample_and_score(policy, prompts, sampling, row_seeds, tok.eos_id, tok.pad_id, cfg.dtype)
    rollout = sample()
    on = " (adapter on)" if cfg.adapter else ""
    results.append(sampler_logprobs_match(rollout, f"sampler log-probs = trainer's{on}", decode_tol))
    if cfg.adapter:
        with disable_lora(policy):
            results.append(sampler_logprobs_match(sample(), "sampler log-probs = trainer's (adapters off)",
                                                  decode_tol))
            results.append(disabled_equals_base(policy, reference, base_tokens, base_mask, cfg.dtype, logprob_tol))
        results.append(sampler_runs_trainers_adapter(rollout))
    # 5. the reward, as PPO reads it and as the RM trainer does
    if cfg.reward_model:
        # The loader PPO's eval and `train.py eval` use; an adapter's missing base falls back to --model. (PPO
        # puts an RM adapter on the policy's own base; tests/test_ppo_roles.py covers that sharing.)
        rm, adapter = load_reward_network(cfg.reward_model, tok, cfg.dtype, device, cfg.load_in_8bit,
                                          base_fallback=cfg.model)
        reward_fn = reward_model_fn(rm, adapter=adapter, eos_id=tok.eos_id)
        results.append(reward_reads_last_real_token(reward_fn, rollout.tokens, rollout.attention_mask,
                                                    tok.pad_id, rm.cfg.vocab_size, cfg.seed, logprob_tol))
        pair_cap = min(PAIR_TOKENS, rm.cfg.max_seq_len - 5)
        texts = [format_prompt(q, j) for q, j, _ in rows] + [format_prompt(q, k) for q, _, k in rows]
        pairs = [ids[:pair_cap] for ids in tok.encode_batch(texts, bos=True)]  # chosen rows, then rejected
        chosen, rejected = pairs[:len(rows)], pairs[len(rows):]
        results += rm_padding_invariance(rm, chosen, rejected, tok.pad_id, cfg.dtype, logprob_tol)
    # 6. the data splits
    splits = split_folders(cfg.data) if cfg.data else {}
    if len(splits) > 1:
        results += splits_share_no_question(splits)
    # 7. 8-bit storage
    if cfg.load_in_8bit:
        results.append(int8_matches_reference(policy, rollout.tokens, rollout.attention_mask, cfg.dtype, INT8_TOLERANCE))

    print(format_table(results))
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} invariants hold" +
          (f"; FAIL: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0
