"""The pair stages' data (train.py rm and dpo): the pairs read once, every 20th held out when no --eval-data
is given, the training loader of global batches and the evaluation loader, and the run's length in steps.

Each step draws one global batch of world x grad_accum x batch_size pairs and rank r trains on its slice,
so a run's curve does not depend on how the batch is split over ranks and accumulation.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from rlhf_engine.data.loaders import PairBatch, PairCounts, PairLoader
from rlhf_engine.data.pairs_io import read_pairs
from rlhf_engine.engine.training.dist import Dist


class PairData(NamedTuple):
    loader: PairLoader  # global batches of pairs_per_step pairs
    held: PairLoader  # the evaluation pairs, in order
    pairs_per_step: int  # world x grad_accum x batch_size
    max_steps: int  # --max-steps, or --epochs over the training pairs


def held_out(table, every: int = 20):
    """(train, eval) tables: every `every`-th pair held out, when no --eval-data is given."""
    idx = np.arange(table.num_rows)
    return table.take(idx[idx % every != every - 1]), table.take(idx[idx % every == every - 1])


def pair_data(cfg, dist: Dist, tok, dpo: bool = False) -> PairData:
    """The loaders a pair stage trains and evaluates on, from its config's data, eval_data, max_length,
    truncate, batch_size, grad_accum, epochs, max_steps and seed. dpo: the loaders' DPO view (data/loaders.py)."""
    table = read_pairs(cfg.data, min_rows=1)
    if cfg.eval_data:
        train_pairs, eval_pairs = table, read_pairs(cfg.eval_data, min_rows=1)
    else:
        train_pairs, eval_pairs = held_out(table)
        if eval_pairs.num_rows == 0:
            raise ValueError(f"{cfg.data}: {table.num_rows} pairs, too few to hold every 20th out for evaluation; "
                             "pass --eval-data")
    pairs_per_step = dist.world_size * cfg.grad_accum * cfg.batch_size
    loader = PairLoader(train_pairs, tok, batch_size=pairs_per_step, max_length=cfg.max_length, seed=cfg.seed,
                        source=cfg.data, dpo=dpo, truncate=cfg.truncate)
    held = PairLoader(eval_pairs, tok, batch_size=cfg.batch_size, max_length=cfg.max_length, shuffle=False,
                      source=cfg.eval_data or cfg.data, dpo=dpo, truncate=cfg.truncate)
    steps_per_epoch = loader.stats.rank_pairs // pairs_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{loader.stats.rank_pairs} usable pairs in {cfg.data} cannot fill one step of "
                         f"{pairs_per_step} pairs (world x grad_accum x batch_size)")
    return PairData(loader, held, pairs_per_step, cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch)))


def dropped_or_cut(stats: PairCounts, cfg) -> str:
    """The log's account of a loader's pairs that did not fit cfg.max_length tokens."""
    if cfg.truncate:
        return (f"{stats.truncated:,} cut to {cfg.max_length} tokens, {stats.too_long:,} dropped as their question "
                "alone fills them")
    return f"{stats.too_long:,} dropped as longer than {cfg.max_length} tokens"


def next_global_batch(data: PairData) -> PairBatch:
    """The next full global batch: the loader ends each epoch, and an epoch's last batch short of
    pairs_per_step is dropped."""
    while True:
        for batch in data.loader:
            if batch.chosen_tokens.shape[0] == data.pairs_per_step:
                return batch
