"""The LLaMA forward: shapes, padding invariance, KV cache, activation checkpointing, heads."""
import pytest
import torch

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.generate import left_pad
from rlhf_engine.engine.model.llama import KVCache, LLaMA, attention_mask_for, positions_from_padding

GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
MHA = ModelConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=97, hidden_dim=80, max_seq_len=64)


def make(cfg, head="lm", seed=0):
    return LLaMA(cfg, head=head).init_weights(generator=torch.Generator().manual_seed(seed)).eval()


def test_shapes():
    model = make(GQA)
    tokens = torch.randint(0, 97, (3, 11))
    assert model(tokens).shape == (3, 11, 97)
    assert model.model(tokens).shape == (3, 11, 64)
    assert make(GQA, head="score")(tokens).shape == (3, 11)
    names = set(model.state_dict())
    assert "model.layers.1.self_attn.k_proj.weight" in names and "lm_head.weight" in names
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 kv heads × 16


def test_positions_and_mask_from_padding():
    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_padding(padding, 5).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert positions_from_padding(padding, 2).tolist() == [[1, 2], [3, 4]]
    mask = attention_mask_for(padding, 5)[0, 0].int()
    # Row 2 (first real token) sees itself only; padding rows see only themselves (never empty).
    assert mask.tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("cfg", [GQA, MHA])
def test_left_padded_batch_equals_each_prompt_alone(cfg):
    model = make(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (7, 3, 12, 1)]
    tokens, mask = left_pad(prompts, 0)
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))
            assert (batch[i, -len(p):] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", [GQA, MHA])
def test_kv_cache_decoding_equals_full_forward(cfg):
    model = make(cfg)
    tokens, mask = left_pad([torch.randint(3, 97, (n,)).tolist() for n in (9, 4)], 0)
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        # Token by token.
        cache = KVCache(cfg, 2, 9)
        steps = [model(tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(9)]
        stepwise = torch.cat(steps, dim=1)
        # Prefill 5, then 4 more in one chunk.
        cache2 = KVCache(cfg, 2, 9)
        chunked = torch.cat([model(tokens[:, :5], attention_mask=mask[:, :5], cache=cache2),
                             model(tokens[:, 5:], attention_mask=mask, cache=cache2)], dim=1)
    real = mask.bool()
    assert (stepwise - full)[real].abs().max().item() <= 1e-5
    assert (chunked - full)[real].abs().max().item() <= 1e-5
    assert cache.length == 9


def test_cache_without_padding_and_overflow():
    model = make(GQA)
    tokens = torch.randint(3, 97, (2, 6))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(GQA, 2, 6)
        stepwise = torch.cat([model(tokens[:, t:t + 1], cache=cache) for t in range(6)], dim=1)
        assert (stepwise - full).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(tokens[:, :1], cache=cache)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = make(GQA).train()
        model.model.grad_checkpointing = ckpt
        model(tokens).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_tied_embeddings_share_one_tensor():
    cfg = ModelConfig(**{**GQA.to_dict(), "tie_embeddings": True})
    model = make(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bf16_forward_is_close_to_fp32():
    model = make(GQA)
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens).float()
    assert (low - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.parametrize("n_kv", [8, 2])
def test_decode_attention_equals_sdpa(n_kv):
    """The bf16 decode step's two-matmul attention (grouped heads, padding mask) is SDPA's math: equal in fp32."""
    import torch.nn.functional as F

    from rlhf_engine.engine.model.llama import decode_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, n_kv, 10, 16, generator=g), torch.randn(3, n_kv, 10, 16, generator=g)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[0, :, :, :4] = False  # a left-padded row
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv != 8)
    torch.testing.assert_close(decode_attention(q, k, v, mask), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(decode_attention(q, k, v, None),
                               F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv != 8), atol=1e-6, rtol=1e-5)


def test_padded_batches_keep_every_real_output_as_each_row_alone():
    """A right- or left-padded batch's real tokens get the hidden states the 4-D-masked path gives and
    each row gives alone. (`right_padded` is what lets a static decode step skip the mask.)"""
    from rlhf_engine.engine.model.llama import attention_mask_for, positions_from_padding, right_padded
    assert right_padded(torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]])) and not right_padded(torch.tensor([[1, 0, 1]]))
    torch.manual_seed(0)
    model = LLaMA(ModelConfig.preset("tiny", vocab_size=300)).init_weights(std=0.2).eval()
    tokens = torch.randint(3, 300, (2, 10))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    with torch.no_grad():
        fast = model.model(tokens, attention_mask=mask)
        masked = model.model(tokens, attention_mask=attention_mask_for(mask, 10),
                             positions=positions_from_padding(mask, 10))
        alone = model.model(tokens[1:, :6])
        real = mask.bool()
        assert (fast[real] - masked[real]).abs().max().item() <= 1e-5
        assert (fast[1, :6] - alone[0]).abs().max().item() <= 1e-5
        left = torch.tensor([[0, 0, 0, 0] + [1] * 6, [1] * 10])  # the same row left-padded
        shifted = torch.cat([tokens[1:, 6:], tokens[1:, :6]], dim=1)
        out = model.model(torch.cat([shifted, tokens[:1]]), attention_mask=left)
        assert (out[0, 4:] - alone[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("call_cost, widths", [(0.0, [12, 5, 9, 1]), (1e12, [12])])
def test_padded_batches_run_on_real_tokens_only_attention_included(monkeypatch, call_cost, widths):
    """A padded batch's linears see its N real tokens ([N, dim], not [B * T, dim]); attention runs on each
    row's real tokens, a call per row when calls are free (call_cost 0) or one call over all rows right-padded
    to the longest when they are dear, for right- and left-padded rows alike. Hidden states and gradients
    equal the masked padded path's on every real token, with and without gradient checkpointing; padding's
    states come back as zeros."""
    import rlhf_engine.engine.model.llama as llama
    import rlhf_engine.engine.model.varlen as varlen
    from rlhf_engine.engine.model.llama import attention_mask_for, positions_from_padding
    monkeypatch.setattr(varlen, "CALL_COST", {"cpu": call_cost})
    torch.manual_seed(0)
    model = LLaMA(ModelConfig.preset("tiny", vocab_size=300)).init_weights(std=0.2)
    lengths = [12, 5, 9, 0, 1]
    tokens = torch.randint(3, 300, (5, 12))
    for left in (False, True):
        mask = torch.tensor([[0] * (12 - n) + [1] * n if left else [1] * n + [0] * (12 - n) for n in lengths])
        real = mask.bool()
        seen, attended = [], []
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
                 for m in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj)]
        real_attend = llama.attend
        monkeypatch.setattr(llama, "attend", lambda q, k, v, m: attended.append(q.shape[2]) or real_attend(q, k, v, m))
        fast = model.model(tokens, attention_mask=mask)
        monkeypatch.setattr(llama, "attend", real_attend)
        for h in hooks:
            h.remove()
        assert seen == [(27, model.cfg.dim), (27, model.cfg.hidden_dim)]  # 12 + 5 + 9 + 1 real tokens
        assert sorted(attended[:len(widths)]) == sorted(widths)  # layer 0's calls; the empty row skipped
        assert fast[~real].abs().max().item() == 0.0
        slow = model.model(tokens, attention_mask=attention_mask_for(mask, 12),
                           positions=positions_from_padding(mask, 12))
        assert (fast[real] - slow[real]).abs().max().item() <= 1e-5
        weights = list(model.model.parameters())
        want = torch.autograd.grad(slow[real].square().sum(), weights)
        for checkpointing in (False, True):
            model.model.grad_checkpointing = checkpointing
            got = torch.autograd.grad(model.model(tokens, attention_mask=mask)[real].square().sum(), weights)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        model.model.grad_checkpointing = False
    # Broken on purpose: rows packed end to end but attended as one sequence (the classic packing bug: a row
    # sees the rows before it) is caught by the same comparison.
    real_rows = llama.attend_rows
    monkeypatch.setattr(llama, "attend_rows",
                        lambda q, k, v, groups: real_rows(q, k, v, varlen.plan_rows((q.shape[0],), 1, q.device)))
    with torch.no_grad():
        assert (model.model(tokens, attention_mask=mask)[real] - slow[real]).abs().max().item() > 1e-2


def test_a_left_padded_prefill_runs_its_linears_on_real_tokens_and_fills_the_cache_for_decode():
    """Generation's prefill (left-padded prompts onto an empty cache) projects and attends only the
    prompts' real tokens, and the cache it fills (in the padded layout) serves the next decode step as the
    full masked forward over prompt + token would."""
    from rlhf_engine.engine.model.llama import KVCache, attention_mask_for, positions_from_padding
    torch.manual_seed(0)
    model = LLaMA(ModelConfig.preset("tiny", vocab_size=300)).init_weights(std=0.2).eval()
    lengths = [10, 4, 7]
    tokens = torch.randint(3, 300, (3, 10))
    mask = torch.tensor([[0] * (10 - n) + [1] * n for n in lengths])
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        cache = KVCache(model.cfg, 3, 11)
        prefill = model.model(tokens, attention_mask=mask, cache=cache)
        hook.remove()
        assert seen == [(21, model.cfg.dim)]  # 10 + 4 + 7 real prompt tokens
        masked = model.model(tokens, attention_mask=attention_mask_for(mask, 10),
                             positions=positions_from_padding(mask, 10))
        real = mask.bool()
        assert (prefill[real] - masked[real]).abs().max().item() <= 1e-5
        step = torch.randint(3, 300, (3, 1))
        grown = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        decoded = model.model(step, attention_mask=grown, cache=cache)[:, 0]
        full = model.model(torch.cat([tokens, step], dim=1), attention_mask=attention_mask_for(grown, 11),
                           positions=positions_from_padding(grown, 11))[:, -1]
        assert (decoded - full).abs().max().item() <= 1e-5


def test_rollout_forwards_read_the_state_before_each_response_token():
    """PPO's rows are [left-padded prompt | right-padded response]. `response_hidden` runs them as they are
    (real tokens only) and reads the state before each response token: equal, on every real response token,
    to the 4-D-masked padded forward sliced at P - 1 + t. Reading one column early or late breaks it."""
    from rlhf_engine.engine.model.llama import attention_mask_for, positions_from_padding
    from rlhf_engine.engine.rl.rollout import response_hidden
    torch.manual_seed(0)
    model = LLaMA(ModelConfig.preset("tiny", vocab_size=300)).init_weights(std=0.2).eval()
    P, R = 7, 5
    prompt_lens, response_lens = [7, 3, 5], [5, 2, 4]
    tokens = torch.randint(3, 300, (3, P + R))
    mask = torch.tensor([[0] * (P - p) + [1] * p + [1] * r + [0] * (R - r) for p, r in zip(prompt_lens, response_lens)])
    response_mask = mask[:, P:].bool()
    with torch.no_grad():
        fast = response_hidden(model.model, tokens, mask, P)
        slow = model.model(tokens, attention_mask=attention_mask_for(mask, P + R),
                           positions=positions_from_padding(mask, P + R))[:, P - 1:-1]
    assert fast.shape == slow.shape == (3, R, model.cfg.dim)
    assert (fast - slow)[response_mask].abs().max().item() <= 1e-5
    assert (fast[:, :-1] - slow[:, 1:])[response_mask[:, 1:]].abs().max().item() > 1e-2  # one column off differs
