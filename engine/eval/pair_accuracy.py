"""A pair stage's held-out accuracy beside "the longer answer wins" (train.py rm and dpo): the accuracy of a
reward model, or of DPO's implicit reward, with a 95% interval, and its difference from the length rule's on
the same pairs with another. The rule is the baseline to beat on Stack Exchange pairs (0.59-0.64 on the shared
dumps), so a figure without it says little.

Intervals are percentile-bootstrap intervals over pairs (engine/eval/stats.py). Pairs of one question are
resampled as if independent (about 1.3 pairs per question in prepared dumps), so they are slightly narrow.
"""
from __future__ import annotations

import numpy as np

from rlhf_engine.engine.eval.stats import MeanInterval, bootstrap_mean
from rlhf_engine.engine.training.dist import Dist, all_gather_objects


def against_length_rule(dist: Dist, outcomes: list[tuple[float, float]], prefix: str) -> dict:
    """The accuracy of "the longer answer wins" on a stage's held-out pairs, and 95% intervals (percentile
    bootstrap over pairs, engine/eval/stats.py) for the stage's accuracy and for its difference from the rule's:
    is the model above chance, and above the rule? outcomes: this rank's (ranked right: 1 or 0, the rule: 1, 1/2
    on a tie, 0) per pair; ranks hold contiguous shares, gathered in rank order, so any world size bootstraps the
    same pairs in the same order."""
    gathered = [o for rank in all_gather_objects(dist, outcomes) for o in rank]
    right, rule = np.array(gathered, dtype=float).reshape(-1, 2).T
    accuracy, gap = (bootstrap_mean(v) if len(v) else MeanInterval(0.0, 0.0, 0.0) for v in (right, right - rule))
    return {f"{prefix}/longer_wins_accuracy": float(rule.mean()) if len(rule) else 0.0,
            f"{prefix}/accuracy_low": accuracy.low, f"{prefix}/accuracy_high": accuracy.high,
            f"{prefix}/minus_length_rule": gap.mean, f"{prefix}/minus_length_rule_low": gap.low,
            f"{prefix}/minus_length_rule_high": gap.high}


def rule_comparison_text(ev: dict, prefix: str) -> str:
    """The final log's words for against_length_rule's figures."""
    return (f"accuracy {ev[prefix + '/accuracy']:.3f} [95% CI {ev[prefix + '/accuracy_low']:.3f}-"
            f"{ev[prefix + '/accuracy_high']:.3f}], the longer answer wins {ev[prefix + '/longer_wins_accuracy']:.3f}: "
            f"the model {ev[prefix + '/minus_length_rule']:+.3f} [{ev[prefix + '/minus_length_rule_low']:+.3f}, "
            f"{ev[prefix + '/minus_length_rule_high']:+.3f}] against that rule")
