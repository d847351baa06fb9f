"""PPO and the critic-free estimators on the demo's task, with the same number of sampled responses per
step, compared by `train.py eval` against SFT under the held-out judge.

Needs a finished demo run (`train.py demo --out RUN`): its SFT checkpoint is the start, its merged RM the
reward PPO optimises, its judge RM the held-out judge, its pairs the data. Each estimator trains in its
own process (so its peak RSS is its own) through `train.py ppo`: PPO samples 32 queries x 1 response,
the others 8 queries x 4 responses, 32 responses per step either way, with the demo's PPO settings
(lr 3e-4, β0 0.3 adaptive to KL 6 over horizon 200, 4 epochs of minibatches of 16). Then one
`train.py eval` compares every final policy with SFT on the evaluation split.

    python bench/estimators.py --run RUN [--steps 40] [--json out.jsonl]

Prints a table and one JSON line per estimator; the eval report and frontier.png land in RUN/estimators.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import emit_json  # noqa: E402

ESTIMATORS = ("ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp", "remax")


def newest(pattern: str) -> str:
    found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit(f"bench/estimators.py: nothing matches {pattern}: run `train.py demo --out RUN` first")
    return found[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished `train.py demo` run folder")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()
    sft, rm = newest(f"{args.run}/sft/checkpoint-*"), f"{args.run}/rm-merged"
    judge, pairs = newest(f"{args.run}/judge/checkpoint-*"), f"{args.run}/pairs"
    out = os.path.join(args.run, "estimators")
    rows = []
    for estimator in ESTIMATORS:
        k = 1 if estimator == "ppo" else 4
        folder = os.path.join(out, estimator)
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "ppo", "--model", sft, "--reward-model", rm,
               "--data", f"{pairs}/rl", "--out", folder, "--estimator", estimator, "--samples-per-prompt", str(k),
               "--batch-size", str(32 // k), "--mini-batch-size", "16", "--max-steps", str(args.steps),
               "--response-min-length", "24", "--response-max-length", "48", "--lr", "3e-4", "--lora-r", "16",
               "--lora-dropout", "0", "--lora-targets", "all-linear", "--kl-coef", "0.3", "--kl-horizon", "200",
               "--save-every", "0", "--sample-every", "0", "--tokenizer", f"{args.run}/tokenizer.model",
               "--device", "cpu"]
        t0 = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{estimator} failed: {done.stderr[-2000:]}")
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if "env/reward_mean" in line]
        steps = [m for m in metrics if m["step"] >= 1]  # step 0 is the warm-up
        step_s = sum(m["time/generate"] + m["time/policy_forward"] + m["time/reference_forward"] + m["time/reward"]
                     + m["time/update"] for m in steps) / len(steps)
        tail = metrics[-10:]
        rows.append(dict(bench="estimators", estimator=estimator, samples_per_prompt=k, steps=args.steps,
                         s_per_step=round(step_s, 2), wall_s=round(time.time() - t0, 1),
                         peak_rss_gb=round(max(m["perf/peak_mem_gb"] for m in metrics), 3),
                         reward_first10=round(sum(m["env/reward_mean"] for m in metrics[:10]) / 10, 3),
                         reward_last10=round(sum(m["env/reward_mean"] for m in tail) / len(tail), 3),
                         kl_last10=round(sum(m["objective/kl"] for m in tail) / len(tail), 2),
                         checkpoint=newest(f"{folder}/checkpoint-*")))
        print(f"{estimator}: {rows[-1]}", flush=True)
    models = [f"SFT={sft}"] + [f"{r['estimator']}={r['checkpoint']}" for r in rows]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "eval", "--models", *models, "--judges",
                           f"judge={judge}", "--proxy", f"proxy={rm}", "--data", f"{pairs}/evaluation",
                           "--max-new-tokens", "48", "--out", os.path.join(out, "eval"), "--device", "cpu"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"eval failed: {done.stderr[-2000:]}")
    with open(os.path.join(out, "eval", "results.json")) as f:
        results = json.load(f)
    print("\n| estimator | responses/prompt | s/step | peak RSS GB | reward first -> last 10 | KL last 10 | "
          "judge win vs SFT | LC | proxy win | KL to SFT (eval) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        arm = results["arms"][r["estimator"]]
        w, lc = arm["judges"]["judge"]["win_rate"], arm["judges"]["judge"]["lc_win_rate"]
        r.update(judge_win=round(w["rate"], 3), judge_win_low=round(w["low"], 3), judge_win_high=round(w["high"], 3),
                 judge_lc_win=round(lc["rate"], 3), proxy_win=round(arm["judges"]["proxy:proxy"]["win_rate"]["rate"], 3),
                 eval_kl=round(arm["kl"]["mean"], 2))
        print(f"| {r['estimator']} | {r['samples_per_prompt']} | {r['s_per_step']} | {r['peak_rss_gb']} | "
              f"{r['reward_first10']} -> {r['reward_last10']} | {r['kl_last10']} | {w['rate']:.0%} "
              f"[{w['low']:.0%}, {w['high']:.0%}] | {lc['rate']:.0%} | {r['proxy_win']:.0%} | {r['eval_kl']} |")
    print(f"\nfrontier: {out}/eval/frontier.png")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
