"""The best PPO checkpoint by the held-out judge: with --eval-every and --judge, every evaluation that raises
the judge's mean score above the best so far names that step's checkpoint the best. PPO keeps it through
rotation, says which step and why in its closing summary, and publishes it as OUT/best (a link to the
checkpoint folder, so `train.py eval --models PPO=OUT/best` takes it) with OUT/best.json (step, scores).

Only the judge may choose: the proxy PPO optimises keeps rising while the answers get worse (the
over-optimisation the judge exists to catch), so without --judge no checkpoint is named best.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from rlhf_engine.engine.training.train_state import checkpoint_path

LINK, RECORD = "best", "best.json"
CRITERION = "eval/judge_score"


class Best(NamedTuple):
    step: int
    judge_score: float
    win_rate: float  # the judge's win rate of that step's answers against the reference policy's
    kl: float  # exact KL to the reference per answer at that step


def load_best(out_dir: str) -> Best | None:
    """The best recorded by an earlier run in out_dir (a resumed run goes on from it), if its checkpoint is there."""
    try:
        with open(os.path.join(out_dir, RECORD)) as f:
            best = Best(**json.load(f))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    return best if os.path.isdir(checkpoint_path(out_dir, best.step)) else None


def improves(best: Best | None, step: int, metrics: dict) -> Best | None:
    """The new best if this evaluation's judge score beats `best` (ties keep the earlier, nearer the start);
    None if it does not, or if there is no judge."""
    if CRITERION not in metrics:
        return None
    if best is not None and metrics[CRITERION] <= best.judge_score:
        return None
    return Best(step, metrics[CRITERION], metrics["eval/win_rate_vs_reference"], metrics["eval/kl_to_reference"])


def publish(out_dir: str, best: Best) -> None:
    """OUT/best.json and the OUT/best link, each replaced atomically (rank 0 only)."""
    tmp = os.path.join(out_dir, f".{RECORD}.tmp")
    with open(tmp, "w") as f:
        json.dump(best._asdict(), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, RECORD))
    link = os.path.join(out_dir, f".{LINK}.tmp")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.basename(checkpoint_path(out_dir, best.step)), link)  # relative: the folder may move
    os.replace(link, os.path.join(out_dir, LINK))


def summary(out_dir: str, best: Best | None, last_step: int, judge: bool) -> list[str]:
    """The closing summary's lines about the best checkpoint."""
    if not judge:
        return ["ppo: no --judge, so no checkpoint is named best (the proxy's best is where over-optimisation "
                "shows least, not where answers are best)"]
    if best is None:
        return []
    where = os.path.join(out_dir, LINK)
    if best.step == last_step:
        why = "the judge scored the last evaluation highest"
    elif best.step == 0:
        why = "the judge scored the starting policy highest: PPO did not improve on it under the judge"
    else:
        why = ("the judge's score fell after it (over-optimisation, or evaluation noise: train.py eval's intervals "
               "tell which)")
    return [f"ppo: best checkpoint by the judge: step {best.step} (judge score {best.judge_score:.3f}, win rate "
            f"{best.win_rate:.0%} against the reference, KL {best.kl:.2f}): {why}; kept as {where}",
            f"ppo: evaluate it: python train.py eval --models PPO={where} ..."]
