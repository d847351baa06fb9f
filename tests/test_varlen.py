"""Varlen attention's plan (engine/model/varlen.py): rows grouped into as few padded calls as pay, on
hand-computed costs, and attention over any plan equal to attention row by row."""
import pytest
import torch

import rlhf_engine.engine.model.varlen as varlen
from rlhf_engine.engine.model.llama import attend_rows
from rlhf_engine.engine.model.varlen import plan_rows

CPU = torch.device("cpu")


def test_rows_of_near_equal_length_share_a_call(monkeypatch):
    """Call cost 1000 pair-dims, 1 head dim, rows of 10, 100, 12 and 98 tokens (packed in that order).
    All in one call: 1000 + 4 * 100^2 = 41,000. A call each: 4,000 + 100 + 10,000 + 144 + 9,604 = 23,848.
    {10, 12} and {98, 100}: 2,000 + 2 * 144 + 2 * 10,000 = 22,288, the cheapest (with {98} and {100} apart,
    22,892). Row 0's tokens are packed at 0..9, row 1's at 10..109, row 2's at 110..121, row 3's at 122..219."""
    monkeypatch.setattr(varlen, "CALL_COST", {"cpu": 1000.0})
    groups = plan_rows((10, 100, 12, 98), 1, CPU)
    assert groups.shapes == ((2, 12), (2, 100))
    want = [*range(0, 10), 0, 0, *range(110, 122),  # rows 0 and 2, row 0 padded with its first token
            *range(122, 220), 122, 122, *range(10, 110)]  # rows 3 and 1, row 3 padded likewise
    assert groups.gather.tolist() == want
    assert groups.scatter.tolist() == [want.index(t) for t in range(220)]  # each packed token's slot


def test_free_calls_give_a_call_per_row_and_dear_calls_one(monkeypatch):
    monkeypatch.setattr(varlen, "CALL_COST", {"cpu": 0.0})
    assert plan_rows((7, 3, 5), 64, CPU) == ((((1, 7), (1, 3), (1, 5))), None, None)  # packed order kept
    monkeypatch.setattr(varlen, "CALL_COST", {"cpu": 1e12})
    assert plan_rows((7, 3, 5), 64, CPU).shapes == ((3, 7),)
    assert plan_rows((), 64, CPU).shapes == ()  # a batch of padding only


@pytest.mark.parametrize("call_cost, shapes", [(0.0, ((1, 10), (1, 100), (1, 12), (1, 98), (1, 1))),
                                               (1000.0, ((3, 12), (2, 100))), (1e12, ((5, 100),))])
def test_attention_over_any_plan_equals_attention_row_by_row(monkeypatch, call_cost, shapes):
    """A call per row, two padded groups of different widths, one padded call: outputs and gradients of q, k, v
    (GQA: 4 query heads over 2 kv heads) equal each row attended alone. Broken on purpose, one row's length
    misplanned lets it see the next row and is caught. (The plan is costed at 1 head dim so that call cost
    1000 mixes the two: rows {1, 10, 12} and {98, 100}.)"""
    torch.manual_seed(0)
    lengths = (10, 100, 12, 98, 1)
    N = sum(lengths)
    q = torch.randn(N, 4, 8, requires_grad=True)
    k, v = (torch.randn(N, 2, 8, requires_grad=True) for _ in range(2))
    rows = [(torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in row), is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        for row in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    want = torch.cat(rows)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    monkeypatch.setattr(varlen, "CALL_COST", {"cpu": call_cost})
    groups = plan_rows(lengths, 1, CPU)
    assert groups.shapes == shapes
    got = attend_rows(q, k, v, groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    leaky = attend_rows(q, k, v, plan_rows((10, 100, 12 + 98, 1), 1, CPU))  # rows 2 and 3 as one
    assert (leaky - want).abs().max().item() > 1e-2
