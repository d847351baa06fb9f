"""What PPO silently assumes, measured: each invariant is a function of models and token rows that
returns a named `Invariant` (what it measured, the tolerance, passed or not).

1. Padding is invisible: a row's logits alone equal its logits inside a left-padded batch, whatever
   the other rows are (positions come from the attention mask, engine/model/llama.py).
2. The KV-cache decode that samples equals the full forward that trains.
3. The sampler's log-probs are the trainer's (PolicyAndValue, under the trainer's autocast): else the
   first importance ratio is not 1 and the KL is not what it claims (StackLLaMA's negative KL).
4. The sampler runs the adapter being trained, and `disable_lora` is the base checkpoint (the
   reference). verl#7495: the adapter never reached the sampler, so PPO trained on the base's samples.
5. The reward is read at the last real token: padding, and tokens the mask hides, move no score.
6. The data splits share no question. 7. An 8-bit linear equals its dequantised float reference.
engine/check.py (`train.py check`) runs them on a user's checkpoint, data and device.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_engine.data.loaders import pad
from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.engine.model.generate import SamplingConfig, left_pad
from rlhf_engine.engine.model.lora import DEFAULT, LoRALinear, lora_layers
from rlhf_engine.engine.model.llama import LLaMA
from rlhf_engine.engine.rl.reward import PairScores, RewardFn
from rlhf_engine.engine.model.precision import autocast
from rlhf_engine.engine.rl.rlhf_math import pairwise_loss
from rlhf_engine.engine.rl.rollout import PolicyAndValue, sample_rows, score_rollout
from rlhf_engine.kernels.int8_matmul import reference as int8_reference


# How far two computations of one log-prob (or RM score) may sit apart before check fails: a row alone against the
# row in a padded batch, the adapter switched off against the base checkpoint, a reward read two ways. The same
# sums reduced in another order and shape: ~1e-6 in fp32 on CPU on the tiny test model, but on SmolLM2-135M a real
# question alone against the same row in a padded batch of 64 measured 1.1-1.7e-4, and 5.7e-4 with an SFT adapter,
# on a far-tail token (log p -13; tokens above -10 stay under 4e-5): alone, a question's few tokens multiply
# through MKL, the batch's through oneDNN (kernels/linear.py's MIN_MACS), and logits of 15-36 carry 30 layers of
# that rounding. Kernels picked per shape, as on CUDA (whose fp32 may also run in TF32): 1e-2 on both, which still
# catches a pad leak (> 1 nat; the stale cache is the decode table's row). bf16 keeps 8 mantissa bits: 0.25
# (SmolLM2's padding rows measure 0 in bf16: a padded row runs on its real tokens alone). docs/ON_POLICY.md.
LOGPROB_TOLERANCE = {("cpu", "fp32"): 1e-2, ("cuda", "fp32"): 1e-2, ("cpu", "bf16"): 0.25, ("cuda", "bf16"): 0.25}
# The sampler's KV-cache decode against one full forward (check's cache and sampler rows, PPO's on-policy
# warning). fp32 on CPU: ~1e-6 on the tiny model, 6e-5 at worst over 4,013 sampled tokens of SmolLM2 (64 real
# questions x 128): 1e-4, tight enough to see a stale adapter after one step. In bf16 the two round at different
# places through every layer, ending in logits of 20-30 held to steps of 1/8. On SmolLM2-135M's real questions
# (64 x 64 sampled tokens, three seeds) the gap averaged 0.043-0.045 nats, its 99.9th percentile 0.28-0.37 and
# its worst token 0.36-0.55, the worst growing ~0.1-0.15 nats per tenfold more tokens; a worst-token bar must
# hold for the largest batch, so 1.0 (the demo's model: 0.16-0.18). In bf16 this bar sees only gaps above a nat
# (another dtype or model, a gross leak), not a stale adapter after a small step: the fp32 check does.
DECODE_LOGPROB_TOLERANCE = {("cpu", "fp32"): 1e-4, ("cuda", "fp32"): 1e-2, ("cpu", "bf16"): 1.0, ("cuda", "bf16"): 1.0}
# Added with an 8-bit base: its activations round to 8 bits per token, so the small float differences between
# decode and prefill can cross a rounding step and move a row; on bitsandbytes (outlier columns, |x| >= 6, moved
# whole for the batch) padding and neighbours too: measured 2.5e-2 on the demo model, 8e-2 and 0.13 on a random
# tiny one (init std 0.15: many activations past the threshold), before the CPU path split each row's own
# outliers (16bf28a). A pad leak still shows (> 1 nat) in fp32; a stale cache (> 0.1) shows in the fp32 check, not
# reliably in the 8-bit one.
INT8_LOGPROB = 0.2
# An 8-bit linear against its dequantised float reference (relative): the kernel also rounds each
# activation row to 8 bits (LLM.int8; kernels/int8_matmul.py measures 1.2-1.6e-2 against the float weight).
INT8_TOLERANCE = 3e-2


def logprob_tolerance(device: torch.device, dtype: str, load_in_8bit: bool = False, decode: bool = False) -> float:
    """The bar for "these two log-probs are the same number": `decode` for a KV-cache decode against a full
    forward (PPO's on-policy warning, check's cache and sampler rows), else for one forward computed two ways
    (check's other rows); accelerators other than CUDA are held to CUDA's."""
    table = DECODE_LOGPROB_TOLERANCE if decode else LOGPROB_TOLERANCE
    base = table.get((device.type, dtype), table[("cuda", dtype)])
    return base + (INT8_LOGPROB if load_in_8bit else 0.0)


class Invariant(NamedTuple):
    name: str
    measured: float  # a difference, a count: 0 is perfect
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.measured <= self.tolerance  # NaN never passes


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |a - b| over the positions where mask is 1 (indexed, not multiplied: NaN * 0 is NaN)."""
    diff = (a.float() - b.float()).abs()
    diff = diff[mask.bool()] if mask is not None else diff
    return float(diff.max()) if diff.numel() else 0.0


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), -1)


# ---- 1. padding ------------------------------------------------------------------------------------

@torch.no_grad()
def padding_invariance(model: LLaMA, rows: list[list[int]], pad_id: int, dtype: str,
                       tolerance: float) -> list[Invariant]:
    """Each row alone vs in two left-padded batches, each with a filler row longer than all of them
    (so every row is padded) and the others in another order (so its neighbours change). Measured on
    the log-prob of each row's own next token, the number PPO's update reads (a whole-vocabulary max
    would be set by the rounding of logits no one samples: one bf16 ulp of a logit of 10 is 0.06)."""
    device = model.lm_head.weight.device
    filler = list(itertools.chain(*rows)) * 3
    width = max(map(len, rows))

    def next_token_logprobs(batch):  # [L_i - 1] for each of the first len(rows) rows
        tokens, mask = left_pad(batch, pad_id, device)
        with autocast(device, dtype):
            logp = log_softmax(model(tokens, attention_mask=mask))  # [B, L, V]
        real = [(lp[m.bool()], t[m.bool()]) for lp, m, t in zip(logp, mask, tokens)][:len(rows)]
        return [lp[:-1].gather(-1, t[1:, None]).squeeze(-1) for lp, t in real]

    alone = [next_token_logprobs([r])[0] for r in rows]
    in_a = next_token_logprobs(rows + [filler[:width + 3]])
    in_b = next_token_logprobs(rows[::-1] + [filler[-width - 7:]])[::-1]
    return [Invariant("left padding changes no log-prob", max(map(max_abs_diff, alone, in_a)), tolerance),
            Invariant("batch composition changes no row", max(map(max_abs_diff, in_a, in_b)), tolerance)]


# ---- 2. KV cache -----------------------------------------------------------------------------------

@torch.no_grad()
def cache_matches_full_forward(model: LLaMA, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                               pad_id: int, dtype: str, tolerance: float) -> Invariant:
    """Greedy decode with the cache, as PPO samples (rollout.sample_rows); each chosen token's log-prob
    against one plain full forward over prompt + response under the same autocast: only the cache differs."""
    gen = sample_rows(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0), None,
                      eos_id, pad_id, dtype)
    tokens, attention_mask, P = gen.rows()
    with autocast(tokens.device, dtype):
        logp = log_softmax(model(tokens, attention_mask=attention_mask)[:, P - 1:-1])  # [B, R, V]
    full = logp.gather(-1, gen.response_tokens[..., None]).squeeze(-1)
    return Invariant("KV-cache decode = full forward", max_abs_diff(full, gen.response_logprobs, gen.response_mask),
                     tolerance)


# ---- 3 and 4. sampler and trainer ------------------------------------------------------------------

def active_adapter(layer: LoRALinear) -> str | None:
    """The adapter whose update this layer's forward adds now (the condition in LoRALinear.forward)."""
    if layer.disabled or layer.active not in layer.adapters or (layer.merged and layer.active == DEFAULT):
        return None
    return layer.active


@contextlib.contextmanager
def adapter_trace(model: LLaMA):
    """Inside the block, every LoRA layer's forward that runs an adapter records {(layer, adapter): checksum},
    the checksum being the sum of that adapter's lora_a and lora_b (float64): two models that run the same
    adapter record the same dict."""
    seen: dict[tuple[str, str], float] = {}

    def hook_for(name):
        def hook(layer, inputs, output):
            active = active_adapter(layer)
            if active is not None:  # a forward with adapters off (PPO's reference pass) runs no adapter
                seen[(name, active)] = float(sum(p.double().sum() for p in layer.adapters[active].parameters()))
        return hook
    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in lora_layers(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


class SampledAndScored(NamedTuple):
    tokens: torch.Tensor  # [B, P + R] prompt then sampled response
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R]
    sampler_logprobs: torch.Tensor  # [B, R] from the KV-cache decode that drew each token
    trainer_logprobs: torch.Tensor  # [B, R] from PolicyAndValue, the forward the PPO update differentiates
    sampler_adapters: dict  # adapter_trace of the sampling
    trainer_adapters: dict  # adapter_trace of the training forward


@torch.no_grad()
def sample_and_score(policy: LLaMA, prompts: list[list[int]], sampling: SamplingConfig, row_seeds: list[int],
                     eos_id: int, pad_id: int, dtype: str) -> SampledAndScored:
    """PPO's steps 1-2 on `prompts`, through the very calls build_rollout makes: rollout.sample_rows (the
    KV-cache decode under the update's autocast), then rollout.score_rollout (the update's own forward,
    the policy's base as the reference) over the same rows in one chunk."""
    pv = PolicyAndValue(policy).eval()
    with adapter_trace(policy) as sampler_adapters:
        gen = sample_rows(pv.policy, prompts, sampling, row_seeds, eos_id, pad_id, dtype)
    tokens, attention_mask, P = gen.rows()
    rows = torch.arange(len(prompts), device=tokens.device)
    with adapter_trace(policy) as trainer_adapters:
        scored = score_rollout(pv, None, tokens, attention_mask, P, sampling.temperature, rows, len(prompts), dtype)
    return SampledAndScored(tokens, attention_mask, gen.response_mask, gen.response_logprobs,
                            scored.logprobs, sampler_adapters, trainer_adapters)


def sampler_logprobs_match(run: SampledAndScored, name: str, tolerance: float) -> Invariant:
    return Invariant(name, max_abs_diff(run.sampler_logprobs, run.trainer_logprobs, run.response_mask), tolerance)


def sampler_runs_trainers_adapter(run: SampledAndScored) -> Invariant:
    """Exact: the same adapter, with the same weights, on the same layers (inf when layers or adapter
    names differ, else the largest checksum difference)."""
    s, t = run.sampler_adapters, run.trainer_adapters
    measured = math.inf if s.keys() != t.keys() or not s else max(abs(s[k] - t[k]) for k in s)
    return Invariant("sampler runs the trainer's adapter", measured, 0.0)


@torch.no_grad()
def disabled_equals_base(policy: LLaMA, base_logprobs: torch.Tensor, tokens: torch.Tensor,
                         attention_mask: torch.Tensor, dtype: str, tolerance: float) -> Invariant:
    """`disable_lora(policy)` (PPO's reference) against log-probs of the checkpoint loaded without the
    adapter, on the same rows; the caller holds disable_lora."""
    with autocast(tokens.device, dtype):
        logp = log_softmax(policy(tokens, attention_mask=attention_mask))
    mask = attention_mask.bool()[..., None].expand_as(logp)
    return Invariant("disable_lora = base checkpoint", max_abs_diff(logp, base_logprobs, mask), tolerance)


# ---- 5. reward -------------------------------------------------------------------------------------

@torch.no_grad()
def reward_reads_last_real_token(reward_fn: RewardFn, tokens: torch.Tensor, attention_mask: torch.Tensor,
                                 pad_id: int, vocab_size: int, seed: int, tolerance: float) -> Invariant:
    """PPO's reward of rollout rows vs each row's real tokens scored alone (no padding at all), the same
    rows with padding appended, and with every masked-out slot (left padding, after EOS, appended) holding
    random tokens. Rows alone catch a read at a padding slot even where padding computes nothing (the
    unpadded forward leaves zeros there, whatever the slot holds)."""
    scores = reward_fn(tokens, attention_mask)
    real = attention_mask.bool()
    alone = torch.cat([reward_fn(row[keep][None], torch.ones_like(row[keep])[None]) for row, keep in zip(tokens, real)])
    padded = reward_fn(F.pad(tokens, (0, 3), value=pad_id), F.pad(attention_mask, (0, 3)))
    junk = torch.randint(0, vocab_size, tokens.shape, generator=torch.Generator().manual_seed(seed))
    scrambled = reward_fn(torch.where(real, tokens, junk.to(tokens.device)), attention_mask)
    return Invariant("reward read at the last real token",
                     max(max_abs_diff(scores, alone), max_abs_diff(scores, padded), max_abs_diff(scores, scrambled)),
                     tolerance)


@torch.no_grad()
def rm_padding_invariance(rm: LLaMA, chosen: list[list[int]], rejected: list[list[int]], pad_id: int, dtype: str,
                          tolerance: float) -> list[Invariant]:
    """The RM trainer's scorer (engine/rm.py) on a right-padded batch vs each row alone; its pairwise
    loss with 5 more padding columns."""
    device, scorer = rm.score.weight.device, PairScores(rm)
    tokens, mask = (t.to(device) for t in pad(chosen + rejected, pad_id))
    with autocast(device, dtype):
        batch = scorer(tokens, mask)
        alone = torch.cat([scorer(t[m][None], m[m][None]) for t, m in zip(tokens, mask)])
        more = scorer(F.pad(tokens, (0, 5), value=pad_id), F.pad(mask, (0, 5)))
    n = len(chosen)
    loss, loss_more = pairwise_loss(batch[:n], batch[n:])[0], pairwise_loss(more[:n], more[n:])[0]
    return [Invariant("RM score: padded batch = rows alone", max_abs_diff(batch, alone), tolerance),
            Invariant("pairwise loss unchanged by padding", max_abs_diff(loss, loss_more), tolerance)]


# ---- 6. data ---------------------------------------------------------------------------------------

def splits_share_no_question(splits: dict[str, str]) -> list[Invariant]:
    """How many questions sit in more than one split: by (site, qid), the key `prepare` splits on
    (qids are per site), and by text (the same question posted twice lands where its qid sends it)."""
    owner: dict = {}
    shared = {"id": set(), "text": set()}
    for split, source in splits.items():
        table = read_pairs(source, columns=("qid", "question", "metadata")).to_pydict()
        for qid, question, metadata in zip(table["qid"], table["question"], table["metadata"]):
            site = metadata[1] if metadata and len(metadata) > 1 else None
            for kind, key in (("id", (site, qid)), ("text", question)):
                if owner.setdefault((kind, key), split) != split:
                    shared[kind].add(key)
    names = ", ".join(splits)
    return [Invariant(f"splits share no question id ({names})", float(len(shared["id"])), 0.0),
            Invariant("splits share no question text", float(len(shared["text"])), 0.0)]


# ---- 7. 8-bit --------------------------------------------------------------------------------------

@torch.no_grad()
def int8_matches_reference(model: LLaMA, tokens: torch.Tensor, attention_mask: torch.Tensor, dtype: str,
                           tolerance: float) -> Invariant:
    """On the activations a forward feeds each 8-bit linear: ‖kernel − dequantised reference‖ / ‖reference‖,
    the worst layer (the kernel also rounds activations to int8; the reference only the weight)."""
    errors = []

    def hook(layer, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        base = layer.base_forward if isinstance(layer, LoRALinear) else layer.functional_forward
        bias = layer.bias if layer.bias is not None else 0
        ref = int8_reference(x, layer.weight, layer.weight_scale).float() + bias
        errors.append((base(layer, x).float() - ref).norm() / ref.norm().clamp(min=1e-30))
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if getattr(m, "weight", None) is not None and m.weight.dtype == torch.int8]
    try:
        with autocast(tokens.device, dtype):
            model(tokens, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    worst = float(torch.stack(errors).max()) if errors else math.inf  # no 8-bit layer at all: fail
    return Invariant(f"8-bit linear = dequantised reference ({len(handles)} layers)", worst, tolerance)
