"""`train.py demo`: the whole StackLLaMA pipeline on built-in synthetic data, on a CPU in minutes.

prepare → tokenizer → SFT (a small LLaMA from scratch) → reward model (LoRA + score head on the SFT
model) → a second, held-out judge RM on other questions → merge → PPO (fresh LoRA on the SFT model
against the merged reward model) → eval (SFT against PPO on held-out questions, under the judge and
the proxy). Everything lands under one run folder, TensorBoard logs of every stage under RUN/*/tb:

    tensorboard --logdir RUN

The synthetic site's answers are voted by a hidden rule (on topic, gives steps, polite; see
data/synthetic.py), so the reward model has something real to learn and PPO something to improve;
the PPO stage logs sample answers with their rewards every 10 steps (TensorBoard, text tab). The
closing summary's `truth` line scores SFT's and PPO's held-out answers with that rule: the ground truth
that the judge only estimates, and where the two part, over-optimisation shows.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from rlhf_engine.data.prepare import PrepareConfig, prepare
from rlhf_engine.data.synthetic import FEATURES, answer_features, rule_points, write_synthetic_posts
from rlhf_engine.data.train_tokenizer import corpus_texts, train_tokenizer
from rlhf_engine.engine import ppo, rm, sft
from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.evaluate import EvalConfig, evaluate
from rlhf_engine.engine.eval.ppo_eval import curve_summary
from rlhf_engine.engine.model.generate import SamplingConfig
from rlhf_engine.engine.model.lora import LoRAConfig
from rlhf_engine.engine.rl.diagnostics import kl_verdict
from rlhf_engine.engine.merge import merge

# PPO settings, tuned on this from-scratch model (seeds 0-2): it is far more peaked than a real LLM
# (SFT perplexity about 1.3), so a few steps at a high learning rate move the KL by tens of nats. At
# lr 3e-4 the KL climbs to the target over about 30 steps, and a short horizon (200 samples, about 6
# steps of 32) lets β respond before it overshoots; StackLLaMA's horizon of 10000 is for 20k-step runs.
KL_TARGET = 6.0
# A judge split beside the usual four: the held-out judge RM learns from questions no other stage sees.
SPLITS = ("finetune=0.26", "reward=0.26", "rl=0.2", "evaluation=0.14", "judge=0.14")


def say(msg: str):
    print(f"\n[demo] {msg}", flush=True)


def hidden_rule_verdict(samples: str, baseline: str = "SFT", arm: str = "PPO") -> str:
    """What the synthetic site's hidden voting rule (data/synthetic.py), which no model sees, says of two
    arms' answers in eval's samples.jsonl: the demo's ground truth, beside the judge that only estimates it.
    A feature the arm gave up is over-optimisation the reward models cannot see."""
    with open(samples) as f:
        rows = [json.loads(line) for line in f]
    features = {(r["arm"], r["question"], r["sample"]): answer_features(r["question_text"], r["response"])
                for r in rows if r["arm"] in (baseline, arm)}
    points = {key: rule_points(f) for key, f in features.items()}
    pairs = [(points[key], points[(baseline, *key[1:])]) for key in points if key[0] == arm]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs)

    def share(who, name):
        mine = [f[name] for key, f in features.items() if key[0] == who]
        return 100 * sum(mine) / len(mine)

    def mean(who):
        return sum(p for key, p in points.items() if key[0] == who) / len(pairs)
    moves = ", ".join(f"{name} {share(baseline, name):.0f}% -> {share(arm, name):.0f}%" for name in FEATURES)
    change = {name: weight * (share(arm, name) - share(baseline, name)) / 100 for name, weight in FEATURES.items()}
    lost = [f"{name} ({delta:+.2f} points per answer)" for name, delta in change.items() if delta <= -0.1]
    return (f"the site's hidden voting rule, which no model sees: {arm} {mean(arm):.2f} points per answer against "
            f"{baseline}'s {mean(baseline):.2f}, better on {100 * wins:.0f}% of {len(pairs)} questions (ties half); "
            f"{moves}" + (f"; lost: {', '.join(lost)}, traded for what its reward model pays for (over-optimisation)"
                          if lost else ""))


def last_checkpoint(folder: str) -> str:
    return os.path.join(folder, sorted(d for d in os.listdir(folder) if d.startswith("checkpoint-"))[-1])


# The demo's recipe, one function per trained stage, so that bench/verdicts.py varies one thing at a time
# on exactly the demo's settings. `common`: tokenizer, seed, device, keep, log_every.

def reward_model_config(sft_model: str, pairs: str, split: str, out: str, common: dict) -> rm.RMConfig:
    return rm.RMConfig(
        model=sft_model, data=os.path.join(pairs, split), eval_data=os.path.join(pairs, "evaluation"), out=out,
        lora=LoRAConfig(r=16, alpha=32, dropout=0.0, targets=("all-linear",)), lr=3e-3, batch_size=8, epochs=3,
        eval_every=0, save_every=0, **common)


def ppo_config(sft_model: str, reward_model, judge: str, pairs: str, out: str, steps: int, common: dict,
               **changes) -> ppo.PPOConfig:
    return ppo.PPOConfig(**{**dict(
        model=sft_model, reward_model=reward_model, data=os.path.join(pairs, "rl"), out=out,
        batch_size=32, mini_batch_size=16, ppo_epochs=4, max_steps=steps, response_min_length=24,
        response_max_length=48, lr=3e-4, lora=LoRAConfig(r=16, dropout=0.0, targets=("all-linear",)),
        kl_coef=0.3, kl_target=KL_TARGET, kl_horizon=200, save_every=0, sample_every=10, eval_every=25,
        eval_data=os.path.join(pairs, "evaluation"), eval_prompts=32, judge=judge, **{**common, "log_every": 1}),
        **changes})


@dataclass(frozen=True)
class DemoConfig:
    out: str | None = field(default=None, metadata={"help": "run folder (default: a fresh runs/demo-DATE-TIME)"})
    seed: int = field(default=0, metadata={"help": "random seed of every stage"})
    ppo_steps: int = field(default=50, metadata={"help": "PPO steps"})


def run(cfg: DemoConfig) -> int:
    t0 = time.time()
    seed, ppo_steps = cfg.seed, cfg.ppo_steps
    out = cfg.out or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    dist = init_dist("cpu")

    say("1/8 prepare: writing a synthetic StackExchange site (Posts.xml) and pairing its answers")
    posts = write_synthetic_posts(os.path.join(out, "site", "Posts.xml"), 1500, seed=seed)
    summary = prepare(PrepareConfig(out=os.path.join(out, "pairs"), posts=(posts,), seed=seed, progress_seconds=1e9,
                                    splits=SPLITS))
    print(summary.table())
    pairs = os.path.join(out, "pairs")

    say("2/8 tokenizer: training a 512-piece BPE sentencepiece model (LLaMA's special ids)")
    tok = train_tokenizer(corpus_texts([os.path.join(pairs, "finetune"), os.path.join(pairs, "reward")]), 512,
                          os.path.join(out, "tokenizer.model"))

    say("3/8 SFT: a ~1M-parameter LLaMA from scratch on questions and their best answers")
    common = dict(tokenizer=tok, seed=seed, device="cpu", keep=1, log_every=50)
    sft_metrics = sft.train(sft.SFTConfig(
        model="demo", data=os.path.join(pairs, "finetune"), out=os.path.join(out, "sft"), lora=None,
        seq_len=128, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, max_steps=300, eval_every=100,
        save_every=0, **common), dist)
    sft_model = last_checkpoint(os.path.join(out, "sft"))

    def reward_model(split: str, folder: str) -> dict:
        return rm.train(reward_model_config(sft_model, pairs, split, os.path.join(out, folder), common), dist)

    say("4/8 reward model: LoRA adapters + a scalar head on the SFT model, on (better, worse) answer pairs")
    rm_metrics = reward_model("reward", "rm")
    say("5/8 held-out judge: the same recipe on the judge split's questions, which PPO never optimises")
    judge_metrics = reward_model("judge", "judge")
    judge = last_checkpoint(os.path.join(out, "judge"))

    say("6/8 merge: folding the reward model's adapters into a full checkpoint (score head kept)")
    rm_model = merge(sft_model, last_checkpoint(os.path.join(out, "rm")), os.path.join(out, "rm-merged"))

    say("7/8 PPO: fresh LoRA on the SFT model against the reward model, KL-penalised (k1, adaptive β), "
        "evaluated against its reference under the judge every 25 steps")
    ppo_cfg = ppo_config(sft_model, rm_model, judge, pairs, os.path.join(out, "ppo"), ppo_steps, common)
    ppo_result = ppo.train(ppo_cfg, dist)

    say("8/8 eval: SFT and PPO answer every held-out question; the judge and the proxy RM score them")
    verdict = evaluate(EvalConfig(
        models=(f"SFT={sft_model}", f"PPO={last_checkpoint(os.path.join(out, 'ppo'))}"), judges=(f"judge={judge}",),
        proxy=f"proxy={rm_model}", data=os.path.join(pairs, "evaluation"), out=os.path.join(out, "eval"),
        sampling=SamplingConfig(max_new_tokens=48, seed=seed), device="cpu"), dist)

    history = ppo_result["history"]
    k = max(1, min(5, len(history) // 4))
    start = sum(h["env/reward_mean"] for h in history[:k]) / k
    end = sum(h["env/reward_mean"] for h in history[-k:]) / k
    tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")  # in the venv, maybe not on PATH
    tensorboard = tensorboard if os.path.exists(tensorboard) else "tensorboard"
    say(f"done in {time.time() - t0:.0f}s. Everything is under {out}; the curves: {tensorboard} --logdir {out}")
    print(f"  SFT      held-out loss {sft_metrics['eval/loss']:.3f} (perplexity {sft_metrics['eval/ppl']:.1f})")
    for name, m in (("RM", rm_metrics), ("judge", judge_metrics)):
        print(f"  {name:<8} accuracy {m['rm/accuracy']:.3f} on {m['rm/eval_pairs']} held-out pairs "
              f"(the longer answer wins {m['rm/longer_wins_accuracy']:.3f})")
    kl = sum(h["objective/kl"] for h in history[-k:]) / k
    kl_full = sum(h["objective/kl_full"] for h in history[-k:]) / k
    print(f"  PPO      reward {start:.3f} over the first {k} steps -> {end:.3f} over the last {k}; "
          f"KL {kl:.2f} nats per response over the last {k} (exact {kl_full:.2f}), {kl_verdict(kl, KL_TARGET)}; "
          f"β {history[-1]['objective/kl_coef']:.3f}")
    print(f"  curve    {curve_summary(ppo_result['evals'], ppo_cfg.eval_prompts)}")
    for sentence in verdict["verdicts"]:
        print(f"  eval     {sentence}")
    print(f"  truth    {hidden_rule_verdict(os.path.join(out, 'eval', 'samples.jsonl'))}")
    print(f"  report   {os.path.join(out, 'eval', 'report.md')} and {os.path.join(out, 'eval', 'frontier.png')}")
    print(f"  try it   {sys.executable} train.py generate --model {sft_model} --adapter "
          f"{last_checkpoint(os.path.join(out, 'ppo'))} --prompt $'Question: How often should I replace the beans?"
          "\\n\\nAnswer:' --max-new-tokens 48")
    return 0
