"""PPO and the critic-free estimators (RLOO, GRPO, Dr. GRPO, REINFORCE++, ReMax) with the same number of
sampled responses per step, compared at matched KL to SFT.

Needs a finished demo run (`train.py demo --out RUN`): its SFT checkpoint is the start, its merged RM the
reward, its judge RM the held-out judge, its pairs the data. Every estimator trains in its own process (so
its peak RSS is its own) with the demo's PPO settings (lr 3e-4, β0 0.3 adaptive to KL 6 over horizon 200,
4 epochs of minibatches of 16, responses of 24-48 tokens): PPO samples 32 queries x 1 response, the others
8 queries x 4 responses, 32 responses per step either way. Three parts:

  demo      `train.py ppo` against the demo RM, a checkpoint every --save-every steps; one `train.py eval`
            scores every checkpoint against SFT on the same held-out questions (judge, proxy, exact KL).
            Plot: judge win rate vs KL to SFT, one curve per estimator through its checkpoints.
  scripted  the same runs with a scripted reward, 10 x (the share of even token ids in the response - 1/2),
            which is the truth here: plot mean reward vs exact KL along training.
  memory    peak RSS of PPO (value head; value network = the RM + an adapter) against RLOO on a random
            llama-60m-shaped base and RM, where the critic is a real cost; a few steps each.

    python bench/estimators.py --run RUN [--steps 40 --save-every 5 --threads 1 --parts demo scripted memory]

Prints a table per part and one JSON line per run; plots and every run folder land in --out
(default RUN/estimators-frontier). A run folder with its final checkpoint is reused, not retrained.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from bench.common import emit_json, random_base_checkpoint, run_worker  # noqa: E402
from rlhf_engine.engine.rl.estimators import ESTIMATORS  # noqa: E402

RESPONSES_PER_STEP = 32
DEMO_PPO_FLAGS = ["--mini-batch-size", "16", "--response-min-length", "24", "--response-max-length", "48",
                  "--lr", "3e-4", "--lora-r", "16", "--lora-dropout", "0", "--lora-targets", "all-linear",
                  "--kl-coef", "0.3", "--kl-horizon", "200", "--sample-every", "0", "--keep", "100", "--device", "cpu"]
PHASES = ("generate", "policy_forward", "reference_forward", "reward", "update")


def newest(pattern: str) -> str:
    found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit(f"bench/estimators.py: nothing matches {pattern}: run `train.py demo --out RUN` first")
    return found[-1]


def demo_paths(run: str) -> dict:
    return dict(sft=newest(f"{run}/sft/checkpoint-*"), rm=f"{run}/rm-merged", judge=newest(f"{run}/judge/checkpoint-*"),
                pairs=f"{run}/pairs", tokenizer=f"{run}/tokenizer.model")


def ppo_flags(model: str, reward_model: str, data: str, tokenizer: str, out: str, estimator: str, steps: int,
              save_every: int, responses: int = RESPONSES_PER_STEP) -> list[str]:
    """`train.py ppo` flags for one estimator: PPO 1 response per query, the others groups of 4."""
    k = 1 if estimator == "ppo" else 4
    return ["--model", model, "--reward-model", reward_model, "--data", data, "--tokenizer", tokenizer,
            "--out", out, "--estimator", estimator, "--samples-per-prompt", str(k), "--batch-size",
            str(responses // k), "--max-steps", str(steps), "--save-every", str(save_every), *DEMO_PPO_FLAGS]


def run_logged(cmd: list[str], log: str, threads: int) -> None:
    """Run cmd with OMP_NUM_THREADS=threads, its stdout and stderr in `log`; a failure shows the tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        with open(log) as f:
            raise SystemExit(f"failed ({log}): {' '.join(cmd)}\n{f.read()[-3000:]}")


def step_stats(folder: str) -> dict:
    """From a run's metrics.jsonl: per-step rows, s/step (engine phase timers, warm-up step 0 left out), peak RSS."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if "env/reward_mean" in line]
    measured = steps[1:]
    s_per_step = sum(sum(m[f"time/{p}"] for p in PHASES) for m in measured) / len(measured)
    return dict(steps=steps, s_per_step=round(s_per_step, 2),
                peak_rss_mib=round(max(m["perf/peak_mem_gb"] for m in steps) * 1024))


def checkpoint_steps(folder: str) -> list[int]:
    return sorted(int(p.rsplit("-", 1)[1]) for p in glob.glob(f"{folder}/checkpoint-*"))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def nearest(points: list[dict], kl: float) -> dict:
    return min(points, key=lambda p: abs(p["kl"] - kl))


def matched_kl(curves: dict[str, list[dict]]) -> float:
    """The largest KL that every estimator reaches (each curve's largest KL, then the smallest of those)."""
    return min(max(p["kl"] for p in points) for points in curves.values())


def plot_curves(curves: dict[str, list[dict]], xlabel: str, ylabel: str, title: str, path: str,
                matched: float) -> None:
    """One line per estimator through its points in training order, y error bars from each point's low/high."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, points in curves.items():
        x, y = [p["kl"] for p in points], [p["y"] for p in points]
        err = [[p["y"] - p["low"] for p in points], [p["high"] - p["y"] for p in points]]
        line, = ax.plot(x, y, marker="o", markersize=3.5, linewidth=1.3, label=name)
        ax.errorbar(x, y, yerr=err, fmt="none", ecolor=line.get_color(), elinewidth=0.8, capsize=2, alpha=0.35)
    ax.axvline(matched, linestyle=":", color="gray", linewidth=1)
    ax.annotate(f"matched KL {matched:.2f}", (matched, ax.get_ylim()[0]), fontsize=7, color="gray",
                xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_table(head: list[str], rows: list[list]) -> None:
    print("\n| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# ---- part 1: the demo task, judged by `train.py eval` ---------------------------------------------

def run_folder(out: str, part: str, estimator: str, steps: int) -> tuple[str, bool]:
    """The estimator's run folder of this part, and whether it already holds its final checkpoint (reused)."""
    folder = os.path.join(out, part, estimator)
    done = os.path.isdir(os.path.join(folder, f"checkpoint-{steps:06d}"))
    print(f"{part} {estimator}: " + (f"reusing {folder}" if done else f"{steps} steps"), file=sys.stderr, flush=True)
    os.makedirs(folder, exist_ok=True)
    return folder, done


def train_demo(paths: dict, estimator: str, args, out: str) -> str:
    folder, done = run_folder(out, "demo", estimator, args.steps)
    if done:
        return folder
    run_logged([sys.executable, os.path.join(ROOT, "train.py"), "ppo",
                *ppo_flags(paths["sft"], paths["rm"], f"{paths['pairs']}/rl", paths["tokenizer"], folder, estimator,
                           args.steps, args.save_every)], os.path.join(folder, "train.log"), args.threads)
    return folder


def eval_checkpoints(paths: dict, folders: dict[str, str], out: str, threads: int) -> dict:
    """One `train.py eval` of SFT and every checkpoint of every estimator: the same questions and SFT answers."""
    eval_out = os.path.join(out, "demo", "eval")
    if not os.path.exists(os.path.join(eval_out, "results.json")):
        models = [f"SFT={paths['sft']}"] + [f"{est}@{s}={folder}/checkpoint-{s:06d}" for est, folder in folders.items()
                                            for s in checkpoint_steps(folder)]
        print(f"demo eval: {len(models)} models", file=sys.stderr, flush=True)
        os.makedirs(eval_out, exist_ok=True)
        run_logged([sys.executable, os.path.join(ROOT, "train.py"), "eval", "--models", *models, "--judges",
                    f"judge={paths['judge']}", "--proxy", f"proxy={paths['rm']}", "--data",
                    f"{paths['pairs']}/evaluation", "--max-new-tokens", "48", "--device", "cpu", "--out", eval_out],
                   os.path.join(out, "demo", "eval.log"), threads)
    with open(os.path.join(eval_out, "results.json")) as f:
        return json.load(f)


def eval_point(results: dict, arm: str, step: int) -> dict:
    e = results["arms"][arm]
    w, lc = e["judges"]["judge"]["win_rate"], e["judges"]["judge"]["lc_win_rate"]
    return dict(step=step, kl=e["kl"]["mean"], y=w["rate"], low=w["low"], high=w["high"], lc=lc["rate"],
                proxy=e["judges"]["proxy:proxy"]["win_rate"]["rate"])


def run_demo(args, out: str) -> list[dict]:
    paths = demo_paths(args.run)
    folders = {est: train_demo(paths, est, args, out) for est in ESTIMATORS}
    results = eval_checkpoints(paths, folders, out, args.threads)
    sft = dict(step=0, kl=0.0, y=0.5, low=0.5, high=0.5, lc=0.5, proxy=0.5)  # every curve starts at SFT
    curves = {est: [sft] + [eval_point(results, f"{est}@{s}", s) for s in checkpoint_steps(folder)]
              for est, folder in folders.items()}
    level = matched_kl(curves)
    path = os.path.join(out, "frontier.png")
    plot_curves(curves, "KL to SFT at evaluation (nats per response)", "judge win rate vs SFT (95% CI)",
                f"demo task, {results['questions']} held-out questions; checkpoints every {args.save_every} steps",
                path, level)
    rows = []
    for est, folder in folders.items():
        stats, at, final = step_stats(folder), nearest(curves[est][1:], level), curves[est][-1]
        rows.append(dict(bench="estimators", part="demo", estimator=est, steps=args.steps, threads=args.threads,
                         questions=results["questions"], matched_kl=round(level, 2), step_at_matched=at["step"],
                         kl_at_matched=round(at["kl"], 2), judge_win=round(at["y"], 3), judge_low=round(at["low"], 3),
                         judge_high=round(at["high"], 3), judge_lc_win=round(at["lc"], 3),
                         proxy_win=round(at["proxy"], 3), final_kl=round(final["kl"], 2),
                         final_judge_win=round(final["y"], 3), final_judge_low=round(final["low"], 3),
                         final_judge_high=round(final["high"], 3), s_per_step=stats["s_per_step"],
                         peak_rss_mib=stats["peak_rss_mib"],
                         curve=[{k: round(v, 3) for k, v in p.items()} for p in curves[est]]))
    print_table(["estimator", "step (KL) nearest the matched KL", "judge win vs SFT [95% CI]", "LC", "proxy win",
                 f"final (step {args.steps}): KL, judge win", "s/step", "peak RSS MiB"],
                [[r["estimator"], f"{r['step_at_matched']} ({r['kl_at_matched']})",
                  f"{pct(r['judge_win'])} [{pct(r['judge_low'])}, {pct(r['judge_high'])}]", pct(r["judge_lc_win"]),
                  pct(r["proxy_win"]), f"{r['final_kl']}, {pct(r['final_judge_win'])} [{pct(r['final_judge_low'])}, "
                  f"{pct(r['final_judge_high'])}]", r["s_per_step"], r["peak_rss_mib"]] for r in rows])
    print(f"matched KL {level:.2f} (the largest every estimator reaches); frontier: {path}")
    return rows


# ---- part 2: a scripted reward (the truth), through engine.ppo.train in a worker --------------------

SCRIPTED_SCALE = 10.0  # spreads the scores over responses (std ~1) like the demo RM's (~1.5-2); unscaled
#                        (std ~0.1) the β·KL penalty swamps them


def even_share_reward(queries: list[list[int]]):
    """A reward function: SCRIPTED_SCALE x (the share of even token ids in each response - 1/2). A reward
    function sees query + response as one row; the response is what follows the row's query, found among
    `queries` (the rl split's, tokenized as the engine's PromptLoader does), so the query never counts."""
    import torch
    known, lengths = {tuple(q) for q in queries}, sorted({len(q) for q in queries}, reverse=True)

    def reward(tokens, attention_mask):
        shares = []
        for row, real in zip(tokens.tolist(), attention_mask.bool().tolist()):
            ids = [t for t, r in zip(row, real) if r]
            start = next((n for n in lengths if tuple(ids[:n]) in known), None)
            if start is None:
                raise ValueError("scripted reward: a row starts with none of the known queries")
            response = ids[start:]
            shares.append(sum(t % 2 == 0 for t in response) / max(len(response), 1))
        return SCRIPTED_SCALE * (torch.tensor(shares) - 0.5)
    return reward


def scripted_worker(spec: dict) -> dict:
    """Child: parse the same `train.py ppo` flags, then train against even_share_reward."""
    import torch

    from rlhf_engine.data.pairs_io import read_pairs
    from rlhf_engine.data.tokenizer import Tokenizer, format_prompt
    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.flags import config_from_args, config_parser
    from rlhf_engine.engine.ppo import PPOConfig, train
    torch.set_num_threads(spec["threads"])
    cfg = config_from_args(PPOConfig, config_parser(PPOConfig).parse_args(spec["flags"]), reward_model=None)
    questions = list(dict.fromkeys(read_pairs(cfg.data)["question"].to_pylist()))
    queries = Tokenizer(cfg.tokenizer).encode_batch([format_prompt(q) for q in questions], bos=True)
    train(cfg, init_dist("cpu"), reward_fn=even_share_reward(queries))
    return {"done": True}


def train_scripted(paths: dict, estimator: str, args, out: str) -> str:
    folder, done = run_folder(out, "scripted", estimator, args.steps)
    if done:
        return folder
    # --reward-model satisfies the parser only: the worker replaces it with the scripted reward.
    spec = dict(flags=ppo_flags(paths["sft"], paths["rm"], f"{paths['pairs']}/rl", paths["tokenizer"], folder,
                                estimator, args.steps, 0), threads=args.threads,
                result=os.path.join(folder, "result.json"))
    with open(os.path.join(folder, "spec.json"), "w") as f:
        json.dump(spec, f)
    run_logged([sys.executable, os.path.abspath(__file__), "--worker", os.path.join(folder, "spec.json")],
               os.path.join(folder, "train.log"), args.threads)
    return folder


def windows(steps: list[dict], size: int) -> list[dict]:
    """Consecutive windows of `size` steps: mean exact KL, mean reward ± one standard error over the steps."""
    points = []
    for start in range(0, len(steps) - size + 1, size):
        w = steps[start:start + size]
        reward = [m["env/reward_mean"] for m in w]
        mu = mean(reward)
        se = (sum((r - mu) ** 2 for r in reward) / (len(w) - 1) / len(w)) ** 0.5
        points.append(dict(step=start + size, kl=mean(m["objective/kl_full"] for m in w), y=mu, low=mu - se,
                           high=mu + se))
    return points


def run_scripted(args, out: str) -> list[dict]:
    paths = demo_paths(args.run)
    folders = {est: train_scripted(paths, est, args, out) for est in ESTIMATORS}
    stats = {est: step_stats(folder) for est, folder in folders.items()}
    curves = {est: windows(s["steps"], args.window) for est, s in stats.items()}
    level = matched_kl(curves)
    path = os.path.join(out, "frontier_scripted.png")
    plot_curves(curves, "exact KL to SFT of the sampled responses (nats per response)",
                f"scripted reward, mean of {args.window} steps ± s.e.",
                f"scripted reward {SCRIPTED_SCALE:g} x (share of even ids in the response - 1/2); {RESPONSES_PER_STEP} "
                f"responses per step", path, level)
    rows = []
    for est, s in stats.items():
        at, first = nearest(curves[est], level), curves[est][0]
        last = windows(s["steps"][-10:], len(s["steps"][-10:]))[0]
        rows.append(dict(bench="estimators", part="scripted", estimator=est, steps=args.steps, threads=args.threads,
                         matched_kl=round(level, 2), step_at_matched=at["step"], kl_at_matched=round(at["kl"], 2),
                         reward_at_matched=round(at["y"], 3), reward_se=round(at["high"] - at["y"], 3),
                         reward_first=round(first["y"], 3), reward_last10=round(last["y"], 3),
                         kl_last10=round(last["kl"], 2), s_per_step=s["s_per_step"], peak_rss_mib=s["peak_rss_mib"],
                         curve=[{k: round(v, 3) for k, v in p.items()} for p in curves[est]]))
    print_table(["estimator", "steps (KL) nearest the matched KL", "reward there ± s.e.",
                 f"reward first {args.window} → last 10 steps", "KL last 10", "s/step", "peak RSS MiB"],
                [[r["estimator"], f"{r['step_at_matched'] - args.window + 1}-{r['step_at_matched']} "
                  f"({r['kl_at_matched']})", f"{r['reward_at_matched']:.3f} ± {r['reward_se']:.3f}",
                  f"{r['reward_first']:.3f} → {r['reward_last10']:.3f}", r["kl_last10"], r["s_per_step"],
                  r["peak_rss_mib"]] for r in rows])
    print(f"matched KL {level:.2f}; frontier: {path}")
    return rows


# ---- part 3: what the critic costs in memory -------------------------------------------------------

MEMORY_RUNS = {"ppo, value head": ("ppo", "ppo", []),  # name: (folder, estimator, extra flags)
               "ppo, --value-model reward": ("ppo-value-reward", "ppo", ["--value-model", "reward"]),
               "rloo k=4": ("rloo", "rloo", [])}


def run_memory(args, out: str) -> list[dict]:
    """A random llama-60m-shaped base (the demo tokenizer's vocabulary) is the policy and, with a fresh score
    head, the RM: PPO's value network is then a second 60m-shaped network trained through an adapter."""
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.model.config import ModelConfig
    paths = demo_paths(args.run)
    vocab = Tokenizer(paths["tokenizer"]).vocab_size
    cfg = ModelConfig.preset("llama-60m", vocab_size=vocab)
    base = random_base_checkpoint(cfg, paths["tokenizer"], os.path.join(out, "memory", f"llama-60m-v{vocab}"))
    rows = []
    for name, (sub, est, extra) in MEMORY_RUNS.items():
        folder = os.path.join(out, "memory", sub)
        flags = ppo_flags(base, base, f"{paths['pairs']}/rl", paths["tokenizer"], folder, est, args.memory_steps, 0,
                          responses=args.memory_responses)
        # Later flags win: a smaller minibatch and a fixed response length than the demo's.
        flags += ["--mini-batch-size", "4", "--response-min-length", "32", "--response-max-length", "32", *extra]
        if not os.path.isdir(os.path.join(folder, f"checkpoint-{args.memory_steps:06d}")):
            os.makedirs(folder, exist_ok=True)
            print(f"memory {name}: {args.memory_steps} steps", file=sys.stderr, flush=True)
            run_logged([sys.executable, os.path.join(ROOT, "train.py"), "ppo", *flags],
                       os.path.join(folder, "train.log"), args.threads)
        with open(os.path.join(folder, "train.log")) as f:
            trainable = float(re.search(r"trainable ([\d.]+) MiB", f.read()).group(1))
        s = step_stats(folder)
        rows.append(dict(bench="estimators", part="memory", run=name, params=cfg.num_params(), vocab=vocab,
                         responses_per_step=args.memory_responses, steps=args.memory_steps, threads=args.threads,
                         trainable_mib=trainable, s_per_step=s["s_per_step"], peak_rss_mib=s["peak_rss_mib"]))
    rloo = rows[-1]["peak_rss_mib"]
    print_table(["run", "trainable MiB", "s/step", "peak RSS MiB", "RLOO saves"],
                [[r["run"], r["trainable_mib"], r["s_per_step"], r["peak_rss_mib"],
                  f"{r['peak_rss_mib'] - rloo} MiB" if r is not rows[-1] else "-"] for r in rows])
    print(f"random llama-60m shape, vocab {vocab} ({cfg.num_params() / 1e6:.1f}M parameters) as policy and RM; "
          f"{args.memory_responses} responses of 32 tokens per step, minibatch 4, {args.memory_steps} steps")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished `train.py demo` run folder")
    ap.add_argument("--out", help="output folder (default RUN/estimators-frontier)")
    ap.add_argument("--parts", nargs="+", choices=["demo", "scripted", "memory"],
                    default=["demo", "scripted", "memory"])
    ap.add_argument("--steps", type=int, default=40, help="PPO steps per estimator")
    ap.add_argument("--save-every", type=int, default=5, help="demo part: a checkpoint (a frontier point) every N")
    ap.add_argument("--window", type=int, default=5, help="scripted part: steps per frontier point")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-responses", type=int, default=8, help="memory part: responses per step")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    ap.add_argument("--json", help="append the JSON lines to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one scripted run from a spec file
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker, scripted_worker)
        return
    if not args.run:
        ap.error("--run is required")
    out = args.out or os.path.join(args.run, "estimators-frontier")
    os.makedirs(out, exist_ok=True)
    parts = {"demo": run_demo, "scripted": run_scripted, "memory": run_memory}
    rows = [row for part in args.parts for row in parts[part](args, out)]
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
