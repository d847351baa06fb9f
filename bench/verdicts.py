"""Was RLHF worth it, over seeds: SFT against PPO (one reward model), PPO (a reward-model ensemble) and DPO
under the demo's held-out judge, one demo run per seed (issue 24's 5-seed tables).

    python bench/verdicts.py --seeds 0 1 2 3 4 --out /tmp/verdicts [--arms ppo ensemble dpo]

Per seed S: `train.py demo --seed S` as it ships (its SFT model, reward model, judge, PPO and verdict:
the "demo" row). Then, on that run's SFT model and splits, with the demo's own settings
(engine/demo.py's recipe functions), each in a fresh process so its peak memory is its own:
- ppo: PPO against the demo's RM as one adapter on the policy's base;
- ensemble: two more RMs (`rm --seed S+1000`, `S+2000`, same split and settings) and PPO against the
  three (`--reward-ensemble`, default mean), the same KL target, so the arms end near the same KL;
- dpo: `train.py dpo` on the reward split (the pairs the RMs learn from), from the SFT model, one arm
  per --dpo-beta (a larger β holds DPO closer to SFT: the way to compare it at PPO's KL).
One `train.py eval` then answers the held-out questions with SFT and every arm, scored by the judge
and the demo's RM (the proxy). Prints one table per seed and the counts across seeds; writes one JSON
line per seed and arm (--json). Runs that already finished are reused, so a killed bench resumes.
Time it on a quiet machine: PPO's s/step is read from its own phase timers.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402,F401  (binds rlhf_engine to this checkout)
from bench.common import emit_json  # noqa: E402
from bench.estimators import pct, step_stats  # noqa: E402

ENSEMBLE_SEEDS = (1000, 2000)  # the extra members' seed offsets


def in_fresh_process(stage: str, cfg) -> None:
    """Run the stage (engine/<stage>.py's train, or evaluate's evaluate) on cfg in a spawned process: its
    own peak RSS, nothing shared."""
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_run_stage, args=(stage, cfg))
    p.start()
    p.join()
    if p.exitcode:
        raise SystemExit(f"bench/verdicts.py: {stage} into {cfg.out} failed (exit {p.exitcode})")


def _run_stage(stage: str, cfg) -> None:
    import importlib
    sys.path.insert(0, ROOT)
    import train  # noqa: F401
    from rlhf_engine.engine.training.dist import init_dist
    module = importlib.import_module(f"rlhf_engine.engine.{stage}")
    (module.evaluate if stage == "evaluate" else module.train)(cfg, init_dist("cpu"))


def finished(folder: str) -> bool:
    return os.path.isdir(folder) and any(d.startswith("checkpoint-") for d in os.listdir(folder))


def run_seed(seed: int, args) -> list[dict]:
    from rlhf_engine.engine import demo
    from rlhf_engine.engine.dpo import DPOConfig
    from rlhf_engine.engine.evaluate import EvalConfig
    from rlhf_engine.engine.model.generate import SamplingConfig
    from rlhf_engine.engine.model.lora import LoRAConfig
    run = os.path.join(args.out, f"seed-{seed}")
    demo_log = os.path.join(args.out, f"seed-{seed}.log")
    if not os.path.exists(os.path.join(run, "eval", "results.json")):
        with open(demo_log, "w") as f:
            subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "demo", "--seed", str(seed), "--out", run],
                           stdout=f, stderr=subprocess.STDOUT, check=True)
    with open(demo_log) as f:
        demo_seconds = float(re.search(r"done in (\d+)s", f.read()).group(1))
    pairs, sft = os.path.join(run, "pairs"), demo.last_checkpoint(os.path.join(run, "sft"))
    rm, judge = demo.last_checkpoint(os.path.join(run, "rm")), demo.last_checkpoint(os.path.join(run, "judge"))
    common = dict(tokenizer=os.path.join(run, "tokenizer.model"), seed=seed, device="cpu", keep=1, log_every=50)
    arms = {"demo": demo.last_checkpoint(os.path.join(run, "ppo"))}
    def ppo_stats(folder: str) -> dict:  # s/step from the phase timers (step 0 left out) and peak RSS
        return {k: v for k, v in step_stats(folder).items() if k != "steps"}

    stats = {"demo": ppo_stats(os.path.join(run, "ppo"))}
    if "ppo" in args.arms:
        out = os.path.join(run, "bench-ppo")
        if not finished(out):
            in_fresh_process("ppo", demo.ppo_config(sft, rm, judge, pairs, out, args.ppo_steps, common))
        arms["ppo"], stats["ppo"] = demo.last_checkpoint(out), ppo_stats(out)
    if "ensemble" in args.arms:
        members = [rm]
        for offset in ENSEMBLE_SEEDS:
            out = os.path.join(run, f"bench-rm-{seed + offset}")
            if not finished(out):
                in_fresh_process("rm", demo.reward_model_config(sft, pairs, "reward", out,
                                                                {**common, "seed": seed + offset}))
            members.append(demo.last_checkpoint(out))
        out = os.path.join(run, f"bench-ensemble-{args.combine}")
        if not finished(out):
            in_fresh_process("ppo", demo.ppo_config(sft, tuple(members), judge, pairs, out, args.ppo_steps, common,
                                                    reward_ensemble=args.combine))
        arms["ensemble"], stats["ensemble"] = demo.last_checkpoint(out), ppo_stats(out)
    for beta in args.dpo_beta if "dpo" in args.arms else ():
        out = os.path.join(run, f"bench-dpo-b{beta:g}")
        if not finished(out):
            in_fresh_process("dpo", DPOConfig(
                model=sft, data=os.path.join(pairs, "reward"), eval_data=os.path.join(pairs, "evaluation"), out=out,
                beta=beta, lr=args.dpo_lr, warmup_steps=10, batch_size=8, epochs=args.dpo_epochs,
                eval_every=0, save_every=0, lora=LoRAConfig(r=16, alpha=32, dropout=0.0, targets=("all-linear",)),
                **common))
        arms[f"dpo-b{beta:g}"] = demo.last_checkpoint(out)
    evaluation = os.path.join(run, "bench-eval")
    in_fresh_process("evaluate", EvalConfig(
        models=(f"SFT={sft}", *(f"{name}={path}" for name, path in arms.items())), judges=(f"judge={judge}",),
        proxy=f"proxy={os.path.join(run, 'rm-merged')}", data=os.path.join(pairs, "evaluation"), out=evaluation,
        sampling=SamplingConfig(max_new_tokens=48, seed=seed), device="cpu"))
    with open(os.path.join(evaluation, "results.json")) as f:
        results = json.load(f)
    rows = []
    for name in arms:
        arm = results["arms"][name]
        win, proxy = arm["judges"]["judge"]["win_rate"], arm["judges"]["proxy:proxy"]["win_rate"]
        rows.append(dict(bench="verdicts", seed=seed, arm=name, judge_win=round(win["rate"], 3),
                         judge_low=round(win["low"], 3), judge_high=round(win["high"], 3),
                         judge_lc_win=round(arm["judges"]["judge"]["lc_win_rate"]["rate"], 3),
                         proxy_win=round(proxy["rate"], 3), kl=round(arm["kl"]["mean"], 2),
                         length=round(arm["length"]["mean"], 1), **stats.get(name, {}),
                         **({"demo_seconds": demo_seconds} if name == "demo" else {})))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", required=True, help="bench folder (one demo run per seed inside)")
    ap.add_argument("--arms", nargs="*", default=["ppo", "ensemble", "dpo"], choices=["ppo", "ensemble", "dpo"],
                    help="arms beside the demo's own PPO")
    ap.add_argument("--combine", default="mean", choices=["mean", "min", "uwo"], help="the ensemble's rule")
    ap.add_argument("--ppo-steps", type=int, default=50, help="PPO steps of the bench's PPO arms (the demo's)")
    ap.add_argument("--dpo-beta", type=float, nargs="+", default=[0.1], help="one DPO arm per β")
    ap.add_argument("--dpo-lr", type=float, default=1e-3)
    ap.add_argument("--dpo-epochs", type=float, default=2.0)
    ap.add_argument("--json", help="append the JSON lines here too")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0, rows = time.time(), []
    for seed in args.seeds:
        rows += run_seed(seed, args)
        print(f"seed {seed} done, {time.time() - t0:.0f}s in all", flush=True)
    print("\n| seed | arm | judge win vs SFT [95% CI] | length-controlled | proxy win | KL (nats) | length | s/step | "
          "peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['arm']} | {pct(r['judge_win'])} [{pct(r['judge_low'])}–{pct(r['judge_high'])}] | "
              f"{pct(r['judge_lc_win'])} | {pct(r['proxy_win'])} | {r['kl']} | {r['length']} | "
              f"{r.get('s_per_step', '')} | {r.get('peak_rss_mib', '')} |")
    print("\n| arm | seeds | judge prefers it (point) | interval above 50% | mean judge win | mean KL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        print(f"| {arm} | {len(mine)} | {sum(r['judge_win'] > 0.5 for r in mine)} | "
              f"{sum(r['judge_low'] > 0.5 for r in mine)} | {pct(sum(r['judge_win'] for r in mine) / len(mine))} | "
              f"{sum(r['kl'] for r in mine) / len(mine):.2f} |")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
