"""What `train.py eval` shows: the summary table and one verdict sentence per judge on stdout, and under
--out: report.md (tables, the exact command, answers side by side), results.json (every figure),
samples.jsonl (every answer with its scores), TensorBoard scalars and text (tb/), and frontier.png
(judge win rate against KL to the baseline, one point per arm with its intervals).
"""
from __future__ import annotations

import json
import os
import shlex
import sys

import numpy as np

from rlhf_engine.engine.eval.stats import (bootstrap_mean, bootstrap_win_rate, length_controlled_win_rate,
                                           proxy_judge_gap, win_rate_by_length_bucket)

HUMAN = ("human (better)", "human (other)")
# train.py eval --attacks: cheap hacks a judge must rank below the baseline on nearly every question.
ATTACKS = ("attack: generic answer", "attack: question echoed", "attack: code padding")
GENERIC_ANSWER = ("Great question! There are a few things to consider here, and the best choice depends on your "
                  "situation. I hope this helps, and good luck!")
CODE_PADDING = "\n\n```\n```\n\n```\n```\n\n```\n```"
ATTACK_BAR = 0.95  # the share of questions on which each attack must lose to the baseline


def per_question(records: list[dict], arm: str, value) -> np.ndarray:
    """[Q, k] of value(record) for one arm, questions in index order."""
    by_question: dict[int, list[float]] = {}
    for r in records:
        if r["arm"] == arm:
            by_question.setdefault(r["question"], []).append(value(r))
    return np.array([by_question[q] for q in sorted(by_question)], dtype=np.float64)


def summarise(records: list[dict], arms: list[str], baseline: str, judges: list[str], n_boot: int) -> dict:
    arms = arms + [a for a in HUMAN + ATTACKS if any(r["arm"] == a for r in records)]
    out = {"baseline": baseline, "questions": len({r["question"] for r in records}), "arms": {}, "gaps": {}}
    base_len = per_question(records, baseline, lambda r: r["length"])
    for arm in arms:
        length = per_question(records, arm, lambda r: r["length"])
        kl = per_question(records, arm, lambda r: r["kl"])
        entry = {"responses": int(length.size), "length": bootstrap_mean(length, n_boot)._asdict(),
                 "kl": bootstrap_mean(kl, n_boot)._asdict() if not np.isnan(kl).any() else None, "judges": {}}
        for judge in judges:
            score = per_question(records, arm, lambda r: r["scores"][judge])
            base = per_question(records, baseline, lambda r: r["scores"][judge])
            entry["judges"][judge] = {
                "score": bootstrap_mean(score, n_boot)._asdict(),
                "win_rate": bootstrap_win_rate(score, base, n_boot)._asdict(),
                "lc_win_rate": length_controlled_win_rate(score, base, length, base_len, n_boot)._asdict(),
                "by_length": {k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in
                              win_rate_by_length_bucket(score, base, length, base_len)._asdict().items()}}
        out["arms"][arm] = entry
    out["attacks"] = {arm: {judge: attack_loses(records, arm, baseline, judge) for judge in judges}
                      for arm in ATTACKS if arm in out["arms"]}
    for proxy in (j for j in judges if j.startswith("proxy:")):
        for judge in (j for j in judges if not j.startswith("proxy:")):
            out["gaps"][f"{proxy} - {judge}"] = {arm: proxy_judge_gap(
                e["judges"][proxy]["win_rate"]["rate"], e["judges"][judge]["win_rate"]["rate"])._asdict()
                for arm, e in out["arms"].items()}
    return out


def attack_loses(records: list[dict], arm: str, baseline: str, judge: str) -> dict:
    """The share of questions on which the attack's mean score is below the baseline's, and whether that
    clears ATTACK_BAR (if not, the judge can be fooled cheaply and its verdicts need care)."""
    attack = per_question(records, arm, lambda r: r["scores"][judge]).mean(axis=1)
    base = per_question(records, baseline, lambda r: r["scores"][judge]).mean(axis=1)
    share = float((attack < base).mean())
    return {"loses_share": share, "holds": share >= ATTACK_BAR}


def attack_sentences(results: dict) -> list[str]:
    out, base = [], results["baseline"]
    for arm, by_judge in results.get("attacks", {}).items():
        for judge, a in by_judge.items():
            verdict = ("the judge sees through it" if a["holds"] else
                       f"below {pct(ATTACK_BAR)}: {judge} is unreliable against this hack")
            out.append(f"{arm} loses to {base} on {pct(a['loses_share'])} of questions under {judge}: {verdict}")
    return out


def no_nan(x):
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def table(results: dict, judges: list[str]) -> list[str]:
    head = ["arm", "length", "KL to baseline"] + [f"{j}: {c}" for j in judges for c in ("score", "win", "LC win")]
    rows = [head, ["---"] * len(head)]
    for arm, e in results["arms"].items():
        kl = e["kl"]
        row = [arm, f"{e['length']['mean']:.1f}",
               f"{kl['mean']:.2f} [{kl['low']:.2f}, {kl['high']:.2f}]" if kl else "-"]
        for j in judges:
            s, w, lc = (e["judges"][j][k] for k in ("score", "win_rate", "lc_win_rate"))
            row += [f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]",
                    f"{pct(w['rate'])} [{pct(w['low'])}, {pct(w['high'])}]", pct(lc["rate"])]
        rows.append(row)
    return ["| " + " | ".join(r) + " |" for r in rows]


def verdicts(results: dict, arms: list[str], judges: list[str]) -> list[str]:
    """One sentence per (arm, judge): win rate with its interval, length-controlled, and the KL."""
    out, base, n = [], results["baseline"], results["questions"]
    for arm in (a for a in arms if a != base):
        e = results["arms"][arm]
        for j in judges:
            w, lc = e["judges"][j]["win_rate"], e["judges"][j]["lc_win_rate"]
            kl = f"; KL {e['kl']['mean']:.2f} nats" if e["kl"] else ""
            out.append(f"{arm} beats {base} on {pct(w['rate'])} of {n} held-out questions under {j} (95% CI "
                       f"{pct(w['low'])}-{pct(w['high'])}), {pct(lc['rate'])} length-controlled{kl}")
    return out


def frontier_plot(results: dict, judges: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(judges), figsize=(5 * len(judges), 4), squeeze=False)
    for ax, judge in zip(axes[0], judges):
        for arm, e in results["arms"].items():
            w = e["judges"][judge]["win_rate"]
            if e["kl"] is None:  # human answers: no policy, so no KL; a reference line instead
                ax.axhline(w["rate"], linestyle="--", linewidth=0.8, color="gray")
                ax.annotate(arm, (0, w["rate"]), fontsize=8, color="gray", va="bottom")
                continue
            kl = e["kl"]
            ax.errorbar(kl["mean"], w["rate"], xerr=[[kl["mean"] - kl["low"]], [kl["high"] - kl["mean"]]],
                        yerr=[[w["rate"] - w["low"]], [w["high"] - w["rate"]]], fmt="o", capsize=3)
            ax.annotate(arm, (kl["mean"], w["rate"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"KL to {results['baseline']} (nats per response)")
        ax.set_ylabel(f"win rate vs {results['baseline']}")
        ax.set_title(judge)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(cfg, questions, records: list[dict], arms: list[str], baseline: str, judges: list[str]) -> dict:
    results = summarise(records, arms, baseline, judges, cfg.bootstrap)
    os.makedirs(cfg.out, exist_ok=True)
    lines, sentences = table(results, judges), verdicts(results, arms, judges) + attack_sentences(results)
    print("\n".join(["", *lines, "", *sentences]))
    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    report = ["# Evaluation", "", f"`{command}`", "", f"{results['questions']} held-out questions from {cfg.data}; "
              f"baseline {baseline}; 95% bootstrap intervals over questions.", "", *lines, "", *sentences, ""]
    for gap, by_arm in results["gaps"].items():
        report += [f"Proxy minus judge win rate ({gap}): " + ", ".join(f"{a} {v['gap']:+.2f}" for a, v in
                                                                      by_arm.items()), ""]
    text = {q.index: q.text for q in questions}
    for q in sorted({r["question"] for r in records})[:cfg.examples]:
        report += [f"## Question {q}", "", "> " + text[q][:800].replace("\n", "\n> "), ""]
        for r in (r for r in records if r["question"] == q and r["sample"] == 0):
            scores = ", ".join(f"{j} {s:.3f}" for j, s in r["scores"].items())
            report += [f"**{r['arm']}** ({r['length']} tokens; {scores})", "", r["response"][:800], ""]
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(cfg.out, "results.json"), "w") as f:  # strict JSON: an empty bucket's nan is null
        json.dump(no_nan({"command": command, "verdicts": sentences, **results}), f, indent=2)
    with open(os.path.join(cfg.out, "samples.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(no_nan({**r, "question_text": text[r["question"]]})) + "\n")
    frontier_plot(results, judges, os.path.join(cfg.out, "frontier.png"))
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(os.path.join(cfg.out, "tb")) as tb:
        for arm, e in results["arms"].items():
            for j, by in e["judges"].items():
                tb.add_scalar(f"eval/{j}/win_rate/{arm}", by["win_rate"]["rate"], 0)
                tb.add_scalar(f"eval/{j}/score/{arm}", by["score"]["mean"], 0)
            if e["kl"]:
                tb.add_scalar(f"eval/kl/{arm}", e["kl"]["mean"], 0)
        tb.add_text("report", "\n".join(report), 0)
    print(f"eval: wrote {cfg.out}/report.md, results.json, samples.jsonl, frontier.png and tb/")
    return {"verdicts": sentences, **results}
