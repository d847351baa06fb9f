"""LLaMA, read bottom-up: RMSNorm, rotary embeddings, attention, MLP, block, transformer, heads.

Follows the LLaMA paper (Touvron et al. 2023) and Meta's release, with Hugging Face tensor names
(`model.layers.0.self_attn.q_proj.weight`, ...) and HF's split-half rotary layout, so transformers'
LLaMA checkpoints load with no key surgery and no weight permutation. The model computes activations
only: no loss, no device moves, no distributed code.

Positions come from the attention mask (position = number of real tokens before this one), so a
padded batch gives, row for row, the logits of each row run alone. A padded batch run whole (or a
prefill onto an empty cache) runs on its real tokens only (`Unpadded`): no linear sees padding, and
attention (`attend_rows`) pads rows only where one call over a few rows costs less than a call per row.
A KVCache holds keys and values by *slot* (column of the padded batch), shared by all rows; padding slots
are masked out.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, noop_context_fn

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.varlen import RowGroups, plan_rows
from rlhf_engine.kernels.attention import causal_attention
from rlhf_engine.kernels.linear import linear
from rlhf_engine.kernels.swiglu import swiglu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 whatever the activation dtype (bf16 sums of squares lose too much).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (split-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                                .float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]: frequency i drives dims i and i + head_dim/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+d/2}) of x [B, H, T, d] by the angles in cos/sin [B, T, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys/values of every layer by slot: k, v are [n_layers, B, n_kv_heads, max_len, head_dim].

    `length` slots are filled. Slots are columns of the (left-padded) batch, so one integer serves all
    rows; which slots hold real tokens is the attention mask's business.

    Static mode (`slot` set to a 1-element long tensor): a step writes its one token at column `slot`
    in place and attends over every column under the caller's mask, so no shape, no Python integer
    and no allocation changes from step to step: what a CUDA graph needs to replay the step.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.slot: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k, v):
        """Write k, v [B, n_kv, T, d] at the next T slots; return all filled slots including them."""
        if self.slot is not None:  # static: one token at column `slot`; every column is returned
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, cache holds {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep_rows(self, rows: torch.Tensor):
        """Drop finished rows so they stop costing compute (rows: LongTensor of batch indices to keep)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)


class Linear(nn.Linear):
    """nn.Linear (same tensors, same keys) whose product runs through kernels.linear: float32 on CPU through
    oneDNN, and, while `packed` holds the weight in oneDNN's layout (generate's decode), by that copy."""

    packed: torch.Tensor | None = None

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.packed)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, unpadded: Unpadded | None = None):
        if unpadded is not None:
            return self.forward_unpadded(x, cos, sin, cache, unpadded)
        B, T, _ = x.shape
        # [B, T, H*d] -> [B, H, T, d]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, n_kv, S, d] with S = cached + T
        if T == 1 and q.device.type == "cpu":  # a decode step (float32 and bf16 alike)
            return self.o_proj(decode_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        out = attend(q, k, v, mask).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # [B, H, T, d] -> [B, T, H*d]

    def forward_unpadded(self, x, cos, sin, cache: KVCache | None, unpadded: Unpadded):
        """x [N, dim]: every row's real tokens end to end. Projections and rotary run on them alone; each row
        attends causally over its own tokens (varlen attention, rows of near-equal length sharing a call where
        that is cheaper: `unpadded.groups`). A prefill also writes k, v into the cache in the padded layout the
        decode steps read."""
        N = x.shape[0]
        q = self.q_proj(x).view(N, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(N, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(N, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # cos, sin [N, d]: per token
        if cache is not None:
            cache.update(self.layer, unpadded.pad(k), unpadded.pad(v))
        return self.o_proj(attend_rows(q, k, v, unpadded.groups).to(x.dtype).flatten(1))


def attend(q, k, v, mask):
    """Attention of q [B, H, T, d] over k, v [B, n_kv, S, d]; mask None means causal (no padding, or
    padding only at the right of each row)."""
    gqa = k.shape[1] != q.shape[1]
    T = q.shape[2]
    # CPU's bf16 flash attention runs at half the speed of its fp32 one, forward and backward (torch 2.13,
    # 4 x 8 heads x 112 x 64: 13 vs 7 ms): attend in fp32, autocast off (it would cast back). Float32 masters
    # under bf16 autocast reach here with float32 q (rotary's cos/sin are float32), which SDPA would cast down.
    fp32 = T > 1 and q.device.type == "cpu" and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu"))
    with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        if mask is None and T > 1:  # causal (kernels/attention.py: blocked matmuls where faster, else SDPA)
            return causal_attention(q, k, v)
        if mask is None:  # T == 1 against a cache needs no mask at all
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def attend_rows(q, k, v, groups: RowGroups):
    """Varlen attention: q [N, H, d], k, v [N, n_kv, d] hold rows of real tokens end to end; each row
    attends causally over its own tokens only -> [N, H, d]. `groups` (varlen.plan_rows) says which rows share
    one causal call over a right-padded block: a call per row does no work on padding, fewer calls cost less
    per call; padding slots are never attended by a real query and never read."""
    if not groups.shapes:  # a batch of padding only
        return q
    if groups.gather is not None:
        q, k, v = (t.index_select(0, groups.gather) for t in (q, k, v))
    sizes = [rows * width for rows, width in groups.shapes]
    # each block [rows * width, h, d] -> [rows, h, width, d] -> attention -> back to [rows * width, H, d]
    out = torch.cat([attend(*(t.view(rows, width, *t.shape[1:]).transpose(1, 2) for t in block), None)
                     .transpose(1, 2).flatten(0, 1)
                     for (rows, width), *block in zip(groups.shapes, q.split(sizes), k.split(sizes), v.split(sizes))])
    return out if groups.scatter is None else out.index_select(0, groups.scatter)


def decode_attention(q, k, v, mask):
    """One query per row (a decode step) as two batched matmuls with the softmax in fp32: q [B, H, 1, d],
    k, v [B, n_kv, S, d] (query head h reads kv head h // (H / n_kv)), mask None or [B, 1, 1, S] bool.
    CPU's bf16 SDPA takes 1.7 ms for this at 16 rows x 8 heads x 112 slots, these two matmuls 0.25 ms."""
    B, H, _, d = q.shape
    n_kv = k.shape[1]
    scores = (q.reshape(B, n_kv, H // n_kv, d) @ k.transpose(-1, -2)).float().mul_(d**-0.5)  # [B, n_kv, g, S]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return (scores.softmax(-1).to(q.dtype) @ v).reshape(B, H, 1, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up, two tensors kept


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, unpadded=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, unpadded)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(padding: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] (True = may attend) for the last T of S slots, from padding [B, S].

    Causal and padding-aware. Each slot may always attend to itself, so a padding query never has
    an empty row (softmax over nothing is NaN); real tokens never see padding.
    """
    S = padding.shape[1]
    query_slot = torch.arange(S - T, S, device=padding.device)[:, None]  # [T, 1]
    key_slot = torch.arange(S, device=padding.device)[None, :]  # [1, S]
    causal = key_slot <= query_slot  # [T, S]
    return (causal & padding.bool()[:, None, None, :]) | (key_slot == query_slot)


def right_padded(padding: torch.Tensor) -> bool:
    """Whether every row of a padding mask [B, S] is its real tokens then only padding. Such a batch needs
    no mask beyond causal: a real token attends only to slots before it, all real, and what a padding slot
    computes is never read. A decode step's static cache (a CUDA graph's) then needs no mask."""
    return not bool((padding[:, 1:].int() > padding[:, :-1].int()).any())


class Unpadded(NamedTuple):
    """A padded batch [B, T] as its N real tokens in one run, row after row: norms, projections, attention
    (`attend_rows`) and the MLP do no work on padding (on real StackExchange rows, a third of a padded batch's
    slots). Any padding pattern works, since a token's position and what it may attend to are fixed by the
    real tokens before it in its row; a prefill also scatters k, v back to the padded layout for the cache."""
    rows: torch.Tensor  # [N] flat index b * T + t of each real token, in order
    groups: RowGroups  # which rows attend in one call (varlen.plan_rows): planned once, used by every layer
    batch: int
    width: int

    @classmethod
    def of(cls, padding: torch.Tensor, head_dims: int) -> Unpadded:
        lengths = tuple(int(n) for n in padding.sum(1).tolist() if n)  # rows with no real token left out
        return cls(padding.flatten().nonzero().squeeze(1), plan_rows(lengths, head_dims, padding.device),
                   *padding.shape)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]"""
        return t.flatten(0, 1).index_select(0, self.rows)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...] with zeros at padding."""
        out = t.new_zeros(self.batch * self.width, *t.shape[1:]).index_copy(0, self.rows, t)
        return out.view(self.batch, self.width, *t.shape[1:])

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token heads [N, h, d] -> the cache's layout [B, h, T, d]."""
        return self.put(t).transpose(1, 2)


def positions_from_padding(padding: torch.Tensor, T: int) -> torch.Tensor:
    """Position of each of the last T slots = number of real tokens before it in its row."""
    return (padding.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]


class Transformer(nn.Module):
    """The backbone (HF's `model.`): token embedding, blocks, final norm. Returns hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.grad_checkpointing = False

    def forward(self, tokens, positions=None, attention_mask=None, cache: KVCache | None = None):
        """tokens [B, T] -> hidden [B, T, dim].

        attention_mask: None (no padding), a 0/1 padding mask [B, S] over all S = cached + T slots,
        or a ready boolean mask [B, 1, T, S] (e.g. attention kept inside packed documents).
        positions [B, T]: by default derived from the padding mask (or 0.. for no mask).
        """
        B, T = tokens.shape
        past = cache.length if cache is not None else 0
        mask = unpadded = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if attention_mask.shape[1] != past + T:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} slots, expected {past + T}")
            if positions is None:
                positions = positions_from_padding(attention_mask, T)
            if not bool(attention_mask.all()):  # (no padding at all: plain causal)
                if past == 0 and (cache is None or cache.slot is None):  # a whole batch, or a prefill
                    unpadded = Unpadded.of(attention_mask, self.cfg.n_heads * self.cfg.head_dim)
                elif not (past == 0 and right_padded(attention_mask)):  # causal alone keeps right padding unseen
                    mask = attention_mask_for(attention_mask, T)
        elif attention_mask is not None:
            mask = attention_mask
        if mask is None and past > 0 and T > 1:  # chunked prefill onto a cache: causal with an offset
            mask = attention_mask_for(torch.ones(B, past + T, device=tokens.device), T)
        if positions is None:
            positions = torch.arange(past, past + T, device=tokens.device).expand(B, T)
        if unpadded is not None:
            tokens, positions = unpadded.take(tokens), unpadded.take(positions)  # [N]
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        context_fn = replay_switch_state(self) if recompute else None
        for block in self.layers:
            if recompute:
                # Recompute the block's activations in backward: memory O(layers) instead of O(layers·T).
                x = checkpoint(block, x, cos, sin, mask, cache, unpadded, use_reentrant=False,
                               context_fn=context_fn)
            else:
                x = block(x, cos, sin, mask, cache, unpadded)
        if cache is not None and cache.slot is None:
            cache.length += T
        x = self.norm(x)
        return x if unpadded is None else unpadded.put(x)


def replay_switch_state(module: nn.Module):
    """A checkpoint context_fn for modules whose forward depends on a switch (LoRA's active adapter).

    Backward recomputes a block after the context that chose the adapter (use_adapter, disable_lora)
    has exited; without this, a value adapter's gradients would come from the policy adapter's
    activations. The recomputation replays the switch state this forward saw.
    """
    saved = [(m, m.switch_state()) for m in module.modules() if hasattr(m, "switch_state")]
    if not saved:
        return noop_context_fn

    @contextlib.contextmanager
    def replay():
        now = [m.switch_state() for m, _ in saved]
        for m, state in saved:
            m.set_switch_state(state)
        try:
            yield
        finally:
            for (m, _), state in zip(saved, now):
                m.set_switch_state(state)

    return lambda: (contextlib.nullcontext(), replay())


class LLaMA(nn.Module):
    """Backbone + one head, in the HF layouts: `lm_head` (LlamaForCausalLM) or `score`
    (LlamaForSequenceClassification with one label: the reward model's scalar head)."""

    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.cfg, self.head = cfg, head
        self.model = Transformer(cfg)
        if head == "lm":
            self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)  # (its `packed` slot: decode packs it too)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.score = nn.Linear(cfg.dim, 1, bias=False)  # hidden state -> one number (reward)

    def forward(self, tokens, positions=None, attention_mask=None, cache=None):
        """Logits [B, T, vocab] (lm head) or scalar scores [B, T] (score head)."""
        hidden = self.model(tokens, positions, attention_mask, cache)
        return self.lm_head(hidden) if self.head == "lm" else self.score(hidden).squeeze(-1)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random init as transformers' LLaMA: normal(0, std) matrices and embeddings, unit norms."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        return self

