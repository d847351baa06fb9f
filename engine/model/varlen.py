"""Varlen attention's plan: which rows of a packed batch share one padded attention call.

An unpadded batch holds its rows' real tokens end to end ([N, heads, d], `llama.Unpadded`); each row must
attend causally over its own tokens only. One call per row does no work on padding but pays a fixed price
per call (on this 2-core CPU, ~40 µs forward and ~150 µs forward + backward at the demo's dims, whatever the
row's size); one padded call for all rows pays it once but attends every row to the longest row's length.
Neither wins everywhere: the demo's 16-64 rows of 20-80 tokens at 4 heads x 32 want few calls, the real
model's rows of 10-400 tokens at 9 heads x 64 want one call per row (2-3x faster than one padded call).
`plan_rows` sorts the rows by length and cuts them into groups, each one causal call over a right-padded
[rows, length] block, minimising calls x `CALL_COST` + attended query-key pairs x head dims: an exact
dynamic programme over the sorted lengths (R^2 / 2 steps for R rows, once per forward, not per layer).

Padding slots copy their row's first token: a real query never sees them (causal, they come after it),
and their outputs are never read, so what they hold changes nothing, and no zero row has to be appended.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# The fixed price of one attention call in query-key pairs x head dims. CPU: fitted on this 2-core AVX2
# machine (bench/attention.py: ~40 µs a call against ~0.15 ns per pair-dim forward, ~150 µs against ~0.4 ns
# forward + backward). CUDA: not measured here; a launch (~10 µs) there is worth far more pairs, so a batch
# is one padded call unless its lengths differ wildly.
CALL_COST = {"cpu": 3e5, "cuda": 1e8}


class RowGroups(NamedTuple):
    shapes: tuple[tuple[int, int], ...]  # (rows, length) of each group's padded block, in call order
    gather: torch.Tensor | None  # [S]: the packed token in each slot of the blocks laid end to end; None: as packed
    scatter: torch.Tensor | None  # [N]: the slot of each packed token; None: as packed


def plan_rows(lengths: tuple[int, ...], head_dims: int, device: torch.device) -> RowGroups:
    """Group rows of `lengths` (all > 0, in packed order) for attention over `head_dims` = heads x d."""
    call = CALL_COST[device.type if device.type in CALL_COST else "cuda"]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    # best[j]: cheapest cost of the j shortest rows; start[j]: where its last group begins. A group of
    # sorted rows i..j-1 is padded to the longest, lengths[order[j - 1]].
    best, start = [0.0], [0]
    for j in range(1, len(order) + 1):
        pairs = lengths[order[j - 1]] ** 2 * head_dims
        cost, i = min((best[i] + call + (j - i) * pairs, i) for i in range(j))
        best.append(cost)
        start.append(i)
    groups, j = [], len(order)
    while j:
        groups.append([order[r] for r in range(start[j], j)])
        j = start[j]
    if all(len(g) == 1 for g in groups):  # a call per row: keep packed order, nothing to move
        return RowGroups(tuple((1, n) for n in lengths), None, None)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    gather, scatter, shapes = [], [0] * offsets[-1], []
    for rows in reversed(groups):  # shortest group first
        width = max(lengths[r] for r in rows)
        shapes.append((len(rows), width))
        for r in rows:
            first, n = offsets[r], lengths[r]
            scatter[first:first + n] = range(len(gather), len(gather) + n)
            gather.extend(range(first, first + n))
            gather.extend([first] * (width - n))
    as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long, device=device)  # noqa: E731
    return RowGroups(tuple(shapes), as_tensor(gather), as_tensor(scatter))
