"""Batched sampling from ragged prompts with a KV cache: greedy, temperature, top-k, top-p.

Prompts are left-padded so every row's next token sits in the last column; positions come from the
attention mask, so padding changes nothing. Each sampled token's log-probability is taken under the
exact distribution it was drawn from (after temperature and any top-k/top-p renormalisation). PPO
compares these with the log-probs its update computes for the same tokens (onpolicy/* metrics, see
docs/ON_POLICY.md): they agree only when both describe one distribution, which is why PPO samples
without top-k/top-p (StackLLaMA's negative-KL trouble came from sampling with tricks and scoring
without them). Rows stop at EOS and are dropped from the batch (and the cache), so a finished row
stops costing compute.

References: Meta's llama/generation.py (left-to-right batched decode), gpt-fast generate.py (static
KV cache), HF's top-p filtering convention (keep the smallest set with cumulative mass >= top_p).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rlhf_engine.data.loaders import pad
from rlhf_engine.engine.model.llama import KVCache, Linear, LLaMA
from rlhf_engine.kernels.linear import pack


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample only from the k likeliest tokens; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    seed: int = field(default=0, metadata={"help": "random seed of the sampler"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Generation(NamedTuple):
    prompt_tokens: torch.Tensor  # [B, P] left-padded with pad_id
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_tokens: torch.Tensor  # [B, R] right-padded with pad_id after EOS (or after the length cap)
    response_mask: torch.Tensor  # [B, R] 1 up to and including EOS, 0 after
    response_logprobs: torch.Tensor  # [B, R] float32 log-prob of each sampled token; 0 where masked
    ended: torch.Tensor  # [B] bool: the response ends with EOS (else it was cut at max_new_tokens)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens [B, P + R], attention mask [B, P + R], P): the rollout's row layout, which every forward
        over prompt + response reads (prompt_response_rows builds it from token lists)."""
        return (torch.cat([self.prompt_tokens, self.response_tokens], 1),
                torch.cat([self.prompt_mask, self.response_mask], 1), self.prompt_tokens.shape[1])


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf. logits: [B, V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor | None = None):
    """(tokens [B], logprobs [B]) from last-position logits [B, V].

    `uniforms` [B] in [0, 1), one per row, pick each row's token by inverse CDF: the first token whose
    cumulative probability exceeds u. The draws come from the caller (one generator per row, drawn
    once per generation), so a row's sample does not depend on which rows share its batch, and the
    whole batch is picked by one cumsum and one searchsorted. Greedy has no sampling distribution to
    speak of; it reports the model's plain log-softmax.
    """
    logits = logits.float()
    if cfg.temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, F.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(1)
    if uniforms is None:
        raise ValueError("sampling at temperature > 0 needs one uniform draw per row")
    scaled = logits / cfg.temperature if cfg.temperature != 1.0 else logits
    logprobs = F.log_softmax(filter_logits(scaled, cfg.top_k, cfg.top_p), -1)
    cdf = logprobs.exp().cumsum_(-1)  # [B, V], non-decreasing: every increment is >= 0
    tokens = torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype) * cdf[:, -1:], right=True).squeeze(1)
    overflow = tokens >= cdf.shape[1]  # u * total rounded up to the total itself (u within 2^-24 of 1)
    if bool(overflow.any()):  # then the last token with mass: the first whose cumulative mass is the total
        tokens = torch.where(overflow, (cdf < cdf[:, -1:]).sum(-1), tokens)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(1)


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """Ragged prompts -> (tokens [B, P], mask [B, P] long) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with BOS for an empty prompt)")
    tokens, mask = pad(prompts, pad_id, left=True)
    return tokens.to(device), mask.long().to(device)


def prompt_response_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                         device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rollout's row layout from token lists: [prompt left-padded to P | response right-padded], with
    the attention mask (long) over both, and P. Every forward over prompt + response reads it this way."""
    prompt_tokens, prompt_mask = left_pad(prompts, pad_id, device)
    response, response_mask = pad(responses, pad_id)
    return (torch.cat([prompt_tokens, response.to(device)], 1),
            torch.cat([prompt_mask, response_mask.long().to(device)], 1), prompt_tokens.shape[1])


def next_token_logits(model: LLaMA, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on each row's last position: hidden [b, dim] -> logits [b, V]. Inside `packed_weights` the
    head multiplies by its packed copy (SmolLM2's 49,152 x 576 head at 16 rows: 6.3 against 20 ms in float32,
    3.8 against 7.2 in bf16). Unpacked on CPU it runs as (W hᵀ)ᵀ, [V, dim] x [dim, b]: for a decode step's few
    rows MKL runs that 1.4x (b = 16) to 3.6x (b = 4) faster than h Wᵀ (bench/generate.py --head). An 8-bit or
    adapted head keeps its own forward."""
    head = model.lm_head
    if (type(head) is not Linear or head.packed is not None or head.bias is not None
            or hidden.device.type != "cpu"):
        return head(hidden)
    return (head.weight @ hidden.T).T.contiguous()  # [V, b] -> [b, V]


def available_memory() -> int:
    """Bytes of memory the OS has free now (Linux; elsewhere 0, which turns packing off)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


@contextlib.contextmanager
def packed_weights(model: LLaMA, rows: int):
    """Within the block, every float linear with a `packed` slot (llama.Linear, the LM head included, and
    LoRALinear's base) multiplies by a copy of its weight in oneDNN's layout for `rows` rows
    (kernels.linear.pack): at decode's 16 rows 1.4-1.5x faster than F.linear by the same weight (the head 3.2x
    faster than its flipped product in float32, 1.9x in bf16), for one more copy of those weights while the
    block runs. The copies go on exit, also when the block raises. A weight that is not float (8-bit), not on the
    CPU or without oneDNN stays as it is, and nothing is packed where the copies would take more than a
    quarter of the memory free now (a 7B model's second copy would not fit beside it)."""
    slots = [m for m in model.modules() if hasattr(m, "packed") and m.weight.is_floating_point()
             and m.weight.device.type == "cpu"]
    # Under autocast (float32 masters, bf16 compute) F.linear multiplies by the weight cast to bf16: pack that.
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if sum(m.weight.numel() * (dtype or m.weight.dtype).itemsize for m in slots) > available_memory() // 4:
        slots = []
    try:
        for m in slots:
            m.packed = pack(m.weight if dtype is None else m.weight.to(dtype), rows)
        yield
    finally:
        for m in slots:
            m.packed = None


class StaticDecoder:
    """Decode steps with fixed shapes (gpt-fast's static KV cache): every row stays in the batch, step t
    writes its token at cache column P + t and attends over all P + R columns under a mask kept in a
    buffer. Inputs are copied into fixed buffers and the step reads only those, so on CUDA it is
    captured once as a CUDA graph and replayed (no per-step launch overhead); elsewhere it runs eagerly,
    the same arithmetic, which the CPU tests hold equal to the dynamic decode's tokens and log-probs."""

    def __init__(self, model: LLaMA, cache: KVCache, prompt_mask: torch.Tensor, max_new_tokens: int):
        B, P = prompt_mask.shape
        device = prompt_mask.device
        self.model, self.cache, self.P = model, cache, P
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position = prompt_mask.sum(1, keepdim=True) - 1  # [B, 1]: advanced before each step
        self.mask = torch.zeros(B, 1, 1, P + max_new_tokens, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :P] = prompt_mask.bool()
        cache.slot = torch.full((1,), P, dtype=torch.long, device=device)  # the first decode column
        self.graph = self.logits = None
        if device.type == "cuda":
            self.graph = self._capture()

    def _forward(self):
        hidden = self.model.model(self.token, positions=self.position, attention_mask=self.mask, cache=self.cache)
        return next_token_logits(self.model, hidden[:, -1])

    def _capture(self):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up steps write column P, which step 0 then overwrites
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        return graph

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feed each row's token t (the t-th response token, 0-based) at column P + t: next logits [B, V]."""
        self.token.copy_(tokens[:, None])
        self.position += 1
        self.cache.slot.fill_(self.P + t)
        self.mask[:, 0, 0, self.P + t] = True
        if self.graph is None:
            return self._forward()
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model: LLaMA, prompts: list[list[int]], cfg: SamplingConfig, eos_id: int, pad_id: int,
             row_seeds: list[int] | None = None, static_cache: bool = False) -> Generation:
    """Sample up to cfg.max_new_tokens for each prompt. With `row_seeds` each row draws its uniforms from
    its own generator, so its sample is the same whichever rows it is batched with (e.g. across ranks).
    `static_cache`: decode through StaticDecoder (fixed shapes; a CUDA graph on CUDA) instead of a cache
    that grows a column per step and drops finished rows."""
    device = model.lm_head.weight.device
    dtype = model.model.norm.weight.dtype
    prompt_tokens, prompt_mask = left_pad(prompts, pad_id, device)
    B, P = prompt_tokens.shape
    if P + cfg.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {cfg.max_new_tokens} exceeds the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    R = cfg.max_new_tokens
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    uniforms = None  # [B, R]: row b's draw for its t-th token
    if cfg.temperature > 0 and row_seeds is not None:
        uniforms = torch.stack([torch.rand(R, generator=torch.Generator(device=device).manual_seed(s), device=device)
                                for s in row_seeds])
    elif cfg.temperature > 0:
        uniforms = torch.rand(B, R, generator=torch.Generator(device=device).manual_seed(cfg.seed), device=device)
    response_tokens = torch.full((B, R), pad_id, dtype=torch.long, device=device)
    response_mask = torch.zeros((B, R), dtype=torch.long, device=device)
    response_logprobs = torch.zeros((B, R), dtype=torch.float32, device=device)

    cache = KVCache(model.cfg, B, P + R, device=device, dtype=dtype)
    hidden = model.model(prompt_tokens, attention_mask=prompt_mask, cache=cache)  # prefill: [B, P, dim]
    logits = next_token_logits(model, hidden[:, -1])  # only the last position is needed: [B, V]
    static = StaticDecoder(model, cache, prompt_mask, R) if static_cache else None
    int8 = any(b.dtype == torch.int8 for b in model.buffers())
    rows = torch.arange(B, device=device)  # original index of each row in the batch
    alive = torch.ones(B, dtype=torch.bool, device=device)  # rows still generating (finished ones may linger)
    attn = prompt_mask
    # Decode steps multiply a few rows by every weight: by copies in oneDNN's layout (packed_weights; with one
    # token to draw there is no decode step to pay for the packing)
    with packed_weights(model, B) if R > 1 else contextlib.nullcontext():
        for step in range(R):
            tokens, logprobs = sample_next(logits, cfg, None if uniforms is None else uniforms[rows, step])
            response_tokens[rows, step] = torch.where(alive, tokens, pad_id)
            response_logprobs[rows, step] = torch.where(alive, logprobs, 0.0)
            response_mask[rows, step] = alive.long()
            if step == R - 1:
                break
            alive &= tokens != eos_id
            n_alive = int(alive.sum())
            if n_alive == 0:
                break
            if static is not None:  # every row stays (fixed shapes)
                logits = static.step(tokens, step)
                continue
            # A finished row lingers (its tokens are not recorded) until a quarter of the batch has finished:
            # dropping rows copies the whole KV cache, which pays only when it removes enough rows. Not under
            # an 8-bit base on bitsandbytes: it moves outlier columns chosen from the whole batch, so a lingering
            # row would move the live rows' quantisation away from what the trainer computes (the CPU int_mm path
            # splits each row's own outliers and would not need this).
            if n_alive <= len(rows) * 3 // 4 or (int8 and n_alive < len(rows)):
                keep = alive.nonzero().squeeze(1)
                rows, tokens, attn, alive = rows[keep], tokens[keep], attn[keep], alive[keep]
                cache.keep_rows(keep)
            attn = torch.cat([attn, attn.new_ones(len(rows), 1)], dim=1)
            hidden = model.model(tokens[:, None], attention_mask=attn, cache=cache)  # [b, 1, dim]
            logits = next_token_logits(model, hidden[:, -1])
    last = response_tokens.gather(1, (response_mask.sum(1) - 1)[:, None]).squeeze(1)  # every row has >= 1 token
    return Generation(prompt_tokens, prompt_mask, response_tokens, response_mask, response_logprobs,
                      ended=last == eos_id)
