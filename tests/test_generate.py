"""Batched generation: golden greedy output, EOS per row, exact sampling log-probs, seeds, filtering."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_engine.engine.model.config import ModelConfig
from rlhf_engine.engine.model.generate import SamplingConfig, filter_logits, generate, left_pad
from rlhf_engine.engine.model.llama import LLaMA

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96, max_seq_len=128)
PROMPTS = [[1, 5, 9, 13, 17], [1, 40], [1, 7, 7, 7, 7, 7, 7, 7, 30]]
EOS, PAD = 2, 0


def seeded_model(seed=1234, std=0.3):
    torch.manual_seed(seed)
    # std 0.3 makes a random net's next-token distribution peaked, so greedy choices are stable;
    # std 0.02 (the usual init) keeps logits small where float32 round-off is compared against 1e-5.
    return LLaMA(CFG).init_weights(std=std).eval()


def test_golden_greedy_generation():
    out = generate(seeded_model(), PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0), eos_id=-1, pad_id=PAD)
    assert out.response_tokens.tolist() == GOLDEN
    assert out.response_mask.all()


# Recorded from this implementation (torch 2.13 CPU, fp32) and kept as a regression anchor: any change
# to the forward, the padding/positions logic or the cache shows up here.
GOLDEN = [[32, 12, 32, 4, 45, 2, 9, 6, 32, 53, 53, 54],
          [53, 20, 32, 54, 63, 40, 7, 26, 37, 54, 6, 30],
          [32, 63, 31, 4, 17, 54, 2, 8, 32, 4, 26, 8]]


def full_forward_logprobs(model, out, temperature=1.0):
    """Log-softmax of one separate forward over prompt + response, at the response tokens."""
    tokens, mask, _ = out.rows()
    P = out.prompt_tokens.shape[1]
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)[:, P - 1:-1].float() / temperature
    return F.log_softmax(logits, -1).gather(-1, out.response_tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_a_separate_forward(temperature):
    model = seeded_model(std=0.02)
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=temperature, seed=3), EOS, PAD)
    ref = full_forward_logprobs(model, out, temperature)
    m = out.response_mask.bool()
    assert (out.response_logprobs[m] - ref[m]).abs().max().item() <= 1e-5
    assert (out.response_logprobs[~m] == 0).all()


def test_logprobs_are_under_the_filtered_distribution():
    """With top-k the sampler's distribution is renormalised over k tokens; log-probs must say so."""
    model = seeded_model()
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=3, seed=0)
    out = generate(model, PROMPTS, cfg, eos_id=-1, pad_id=PAD)
    tokens, mask, _ = out.rows()
    P = out.prompt_tokens.shape[1]
    with torch.no_grad():
        logits = model(tokens, attention_mask=mask)[:, P - 1:-1]
    B, R, V = logits.shape
    filtered = filter_logits(logits.reshape(B * R, V), top_k=3).view(B, R, V)
    ref = F.log_softmax(filtered, -1).gather(-1, out.response_tokens[..., None]).squeeze(-1)
    assert (out.response_logprobs - ref).abs().max().item() <= 1e-5
    assert torch.isfinite(ref).all()  # every sampled token was inside the top 3
    plain = full_forward_logprobs(model, out)
    assert (out.response_logprobs > plain + 1e-3).any()  # renormalising raised some probabilities


def test_eos_stops_each_row_separately_and_drops_finished_rows():
    model = seeded_model()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0), eos_id=-1, pad_id=PAD)
    eos = free.response_tokens[0, 3].item()  # make row 0's 4th token the end of text
    first = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in free.response_tokens]
    batch_sizes = []
    hook = model.model.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0), eos_id=eos, pad_id=PAD)
    hook.remove()
    for b, stop in enumerate(first):
        n = 12 if stop is None else stop + 1
        assert out.response_mask[b].tolist() == [1] * n + [0] * (12 - n)
        assert out.response_tokens[b, :n].tolist() == free.response_tokens[b, :n].tolist()
        assert (out.response_tokens[b, n:] == PAD).all()  # padding after EOS, never another EOS
    assert first[0] <= 3
    assert batch_sizes[0] == 3 and min(batch_sizes) < 3  # finished rows left the batch


def test_seed_reproducibility():
    model = seeded_model()
    run = lambda seed: generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, seed=seed), EOS, PAD)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.response_tokens, b.response_tokens)
    assert not torch.equal(a.response_tokens, c.response_tokens)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # Cumulative mass before each token: 0, .5, .8, .95 -> top_p=0.8 keeps the first two tokens (.5+.3 >= .8).
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]


def test_bad_sampling_inputs():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate(seeded_model(), [[1] * 100], SamplingConfig(max_new_tokens=40), EOS, PAD)


def test_row_seeds_make_a_row_independent_of_its_batch():
    model = seeded_model(std=0.02)
    cfg = SamplingConfig(max_new_tokens=8)
    together = generate(model, PROMPTS, cfg, EOS, PAD, row_seeds=[11, 12, 13])
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], cfg, EOS, PAD, row_seeds=[11 + i])
        n = int(alone.response_mask.sum())
        assert together.response_tokens[i, :n].tolist() == alone.response_tokens[0, :n].tolist()


def test_inverse_cdf_sampling_by_hand():
    """The batch is picked by one cumsum + searchsorted: the first token whose cumulative mass exceeds u."""
    from rlhf_engine.engine.model.generate import sample_next
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(7, 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.81, 0.96, 0.999])
    tokens, logprobs = sample_next(logits, SamplingConfig(), u)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert torch.allclose(logprobs, torch.log(torch.tensor([0.5, 0.5, 0.3, 0.3, 0.15, 0.05, 0.05])))
    # top-k 2 leaves mass on tokens 0 and 1 only; u * total rounding up to the total must not pick a
    # zero-mass token (u = 1.0 stands in for that rounding).
    tokens, logprobs = sample_next(logits[:2], SamplingConfig(top_k=2), torch.tensor([0.7, 1.0]))
    assert tokens.tolist() == [1, 1] and torch.isfinite(logprobs).all()


def test_inverse_cdf_sampling_matches_the_distribution():
    from rlhf_engine.engine.model.generate import sample_next
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 40_000
    tokens, _ = sample_next(probs.log().expand(n, 4), SamplingConfig(temperature=1.0),
                            torch.rand(n, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert (freq - probs).abs().max().item() < 4 * (0.25 / n) ** 0.5  # 4 standard errors at most


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_decode_gives_the_dynamic_decodes_tokens_and_logprobs(temperature):
    """The graph-ready decode (fixed shapes, every row kept, a mask over all columns) on CPU: the same tokens
    and log-probs as the growing cache that drops finished rows, with ragged prompts and rows ending early."""
    model = seeded_model(std=0.02)
    cfg = SamplingConfig(max_new_tokens=10, temperature=temperature)
    free = generate(model, PROMPTS, cfg, -1, PAD, row_seeds=[5, 6, 7])
    eos = free.response_tokens[1, 2].item()  # row 1 ends at its third token
    dynamic = generate(model, PROMPTS, cfg, eos, PAD, row_seeds=[5, 6, 7])
    static = generate(model, PROMPTS, cfg, eos, PAD, row_seeds=[5, 6, 7], static_cache=True)
    assert dynamic.response_mask[1].sum() < 10  # a row did end early
    assert torch.equal(static.response_tokens, dynamic.response_tokens)
    assert torch.equal(static.response_mask, dynamic.response_mask)
    torch.testing.assert_close(static.response_logprobs, dynamic.response_logprobs, atol=1e-5, rtol=0)
