"""How far from this machine's limit a step runs: measured peaks, the model's FLOPs and bytes, and the ratio.

Peaks are measured, not assumed: the best of a few large matmuls per dtype (fp32 and bf16 through the
engine's own kernels.linear, which takes oneDNN for float32 on CPU where torch's `@` takes MKL, and int8 through
torch._int_mm where it is fast) and a large copy for memory bandwidth, once per process and device
(about 0.5 s on a 2-core CPU). Vendor datasheet peaks are far from what a given CPU, thread count or
GPU clock delivers; the measured ones make "fraction of peak" mean "room left on this machine".

FLOPs are model FLOPs, counted from the config on real (unpadded) tokens, the PaLM / nanoGPT way:
  forward            2·N per token through the layers' linears (N = their weights; the embedding is a
                     lookup), 2·V·dim per position the LM head runs on, and attention 4·dim per layer
                     per attended key (QKᵀ and AV; a token at position i of a causal row attends i keys).
  frozen-base train  forward + the input-gradient backward, which costs a forward again: 4·N per token
                     (LoRA, or a frozen 8-bit base: no weight gradients for the base; LoRA's own are noise)
  full fine-tuning   forward + input gradients + weight gradients: 6·N per token
  attention          no weights: its backward is 2 × its forward in either mode (dQ, dK, dA, dV).
Recomputation (the chunked LM-head backward, gradient checkpointing) is work the model did not ask for
and is not counted. Decode is bound by memory, not FLOPs: each decode step reads every weight once
and each row's KV cache so far; its bytes over the generate time, against the measured bandwidth.
"""
from __future__ import annotations

import functools
import math
import time
from typing import NamedTuple

import torch

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.kernels.linear import linear


class Peaks(NamedTuple):
    fp32: float  # FLOP/s of a large float32 matmul
    bf16: float  # FLOP/s in bfloat16
    int8: float  # int8 multiply-add ops/s (torch._int_mm); nan where it has no fast path
    bandwidth: float  # bytes/s of a large copy (read + write)


@functools.cache
def measured_peaks(device_type: str) -> Peaks:
    """Best of a few timed runs each; cached, so a process measures once per device type."""
    device = torch.device(device_type)
    n = 1024 if device.type == "cpu" else 8192

    def best_seconds(fn, repeat=10):  # the best of 10: one slow moment of a shared machine must not set the peak
        fn()  # warm-up: allocation, thread pool, kernel selection
        times = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    def matmul_rate(dtype):
        # A dtype this CPU only emulates (bf16 without AVX-512: ~1 GFLOP/s on AVX2) is measured on a small
        # matrix: at full size eleven runs would take twenty seconds of every run's start.
        small = n // 4
        a, b = (torch.randn(small, small, device=device).to(dtype) for _ in range(2))
        rate = 2 * small**3 / best_seconds(lambda: linear(a, b), repeat=3)  # a bᵀ: the same FLOPs as a b
        if 2 * n**3 / rate > 0.1:
            return rate
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        return 2 * n**3 / best_seconds(lambda: linear(a, b))

    int8 = float("nan")
    if device.type == "cuda" or torch.backends.cpu.get_cpu_capability() == "AVX512":
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
        int8 = 2 * n**3 / best_seconds(lambda: torch._int_mm(a, a))
    src = torch.empty((64 if device.type == "cpu" else 1024) * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src))
    return Peaks(matmul_rate(torch.float32), matmul_rate(torch.bfloat16), int8, bandwidth)


def describe(peaks: Peaks) -> str:
    int8 = f", int8 {peaks.int8 / 1e9:,.0f} GOPS" if math.isfinite(peaks.int8) else ""
    return (f"matmul fp32 {peaks.fp32 / 1e9:,.0f} GFLOP/s, bf16 {peaks.bf16 / 1e9:,.0f} GFLOP/s{int8}; "
            f"copy {peaks.bandwidth / 1e9:,.1f} GB/s")


def peak_kind(peaks: Peaks, dtype: str, load_in_8bit: bool = False) -> str:
    """Which peak the base's matmuls can reach ("fp32", "bf16" or "int8"): int8 for an 8-bit base where
    int8 has a fast path, else the compute dtype's."""
    if load_in_8bit and math.isfinite(peaks.int8):
        return "int8"
    return "bf16" if dtype == "bf16" else "fp32"


def matmul_peak(peaks: Peaks, dtype: str, load_in_8bit: bool = False) -> float:
    return getattr(peaks, peak_kind(peaks, dtype, load_in_8bit))


# ---- FLOPs and bytes (pure functions of the config and the token counts) ------------------------------

def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of every layer's linears (attention q/k/v/o and the MLP): the N of 2·N FLOPs per token."""
    attention = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return cfg.n_layers * (attention + 3 * cfg.dim * cfg.hidden_dim)


def causal_attended(lengths) -> int:
    """Keys attended by all tokens of causal rows of these real lengths: Σ n(n+1)/2."""
    return int(sum(n * (n + 1) // 2 for n in lengths))


def forward_flops(cfg: ModelConfig, tokens: int, head_positions: int, attended: int) -> float:
    """One forward: the layers on `tokens`, the LM head on `head_positions`, attention over `attended` keys."""
    return (2 * layer_matmul_params(cfg) * tokens + 2 * cfg.vocab_size * cfg.dim * head_positions
            + 4 * cfg.n_layers * cfg.dim * attended)


def training_flops(cfg: ModelConfig, tokens: int, head_positions: int, attended: int, full: bool) -> float:
    """Forward + backward: 6·N per token for full fine-tuning, 4·N for a frozen base (LoRA); attention ×3."""
    linear = 3 if full else 2
    return (linear * 2 * layer_matmul_params(cfg) * tokens + linear * 2 * cfg.vocab_size * cfg.dim * head_positions
            + 3 * 4 * cfg.n_layers * cfg.dim * attended)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, full: bool, lm_head: bool = True) -> float:
    """Per token of causal rows of seq_len, with the LM head on every position (SFT's loss) or on none (a
    reward model's scalar head, whose FLOPs are negligible)."""
    return training_flops(cfg, seq_len, seq_len if lm_head else 0, causal_attended([seq_len]), full) / seq_len


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the matmul weights a decode step reads (embedding excluded: it reads one row per token)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    skip = {id(p) for p in embed.parameters()} if embed is not None else set()
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        skip.discard(id(lm_head.weight))  # a tied head is read in full every step
    tensors = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in skip and t.dim() >= 2]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_bytes(cfg: ModelConfig, model_bytes: int, steps: int, kv_reads: int, kv_element_bytes: int) -> float:
    """Bytes a decode moves: every weight once per step, and `kv_reads` cached positions (summed over rows
    and steps) of keys and values in every layer."""
    return model_bytes * steps + 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * kv_element_bytes * kv_reads


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device, dtype: str,
        load_in_8bit: bool = False) -> float:
    return tokens_per_s * flops_per_token / matmul_peak(measured_peaks(device.type), dtype, load_in_8bit)


# ---- PPO's step report ---------------------------------------------------------------------------------

class StepReport(NamedTuple):
    metrics: dict[str, float]  # perf/* scalars for the logs
    line: str  # "update 71% of fp32 peak, score 45%, decode 38% of bandwidth"


def padding_share(lengths, width: int) -> float:
    """The share of a [len(lengths), width] batch's slots that are padding, for rows of real `lengths`."""
    slots = len(lengths) * width
    return 1.0 - sum(int(n) for n in lengths) / slots if slots else 0.0


def ppo_step_report(cfg: ModelConfig, prompt_lengths, response_lengths, seconds: dict[str, float],
                    update_passes: float, full: bool, peak: float, peak_name: str, bandwidth: float,
                    model_bytes: int, kv_element_bytes: int) -> StepReport:
    """Each phase of one PPO step against the machine's limit, from its real token counts per row.

    generate: every token computed once (the prompt in the prefill, each response token in one decode
    step) with the LM head on the response tokens; its bytes are the weights once per decode step plus
    each row's KV cache so far. score: the policy and the reference forwards (2 forwards). update:
    `update_passes` training passes over every row (PPO epochs x the share of minibatches that ran).
    """
    p, r = [int(x) for x in prompt_lengths], [int(x) for x in response_lengths]
    tokens, responses = sum(p) + sum(r), sum(r)
    attended = causal_attended(a + b for a, b in zip(p, r))
    kv_reads = sum(a * b + b * (b - 1) // 2 for a, b in zip(p, r))  # decode step t of a row reads a + t slots
    gen_flops = forward_flops(cfg, tokens, responses, attended)
    gen_bytes = decode_bytes(cfg, model_bytes, max(r, default=0), kv_reads, kv_element_bytes)
    score_flops = 2 * forward_flops(cfg, tokens, responses, attended)
    update_flops = update_passes * training_flops(cfg, tokens, responses, attended, full)
    t_gen = seconds["generate"]
    t_score = seconds["policy_forward"] + seconds["reference_forward"]
    t_update = seconds["update"]
    frac = lambda work, s, limit: work / s / limit if s > 0 else float("nan")  # noqa: E731
    metrics = {"perf/generate_bandwidth_frac": frac(gen_bytes, t_gen, bandwidth),
               "perf/generate_gflop_s": gen_flops / t_gen / 1e9 if t_gen > 0 else float("nan"),
               "perf/score_peak_frac": frac(score_flops, t_score, peak),
               "perf/update_peak_frac": frac(update_flops, t_update, peak),
               "perf/update_gflop_s": update_flops / t_update / 1e9 if t_update > 0 else float("nan")}
    line = (f"update {metrics['perf/update_peak_frac']:.0%} of {peak_name} peak, score "
            f"{metrics['perf/score_peak_frac']:.0%}, decode {metrics['perf/generate_bandwidth_frac']:.0%} of bandwidth")
    return StepReport(metrics, line)
