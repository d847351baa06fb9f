"""The peer at the real shape: TRL 0.11.4's classic PPOTrainer (the StackLLaMA API) on the same model, the
same queries and the same response caps as bench/ppo_step.py, in its own virtual environment (issue 23).

    python bench/trl_peer.py --model RUN/sft-merged --reward-model RUN/rm-merged --data RUN/pairs/rl \\
        --response-length 32-64 --steps 3

Set-up, once: a venv (--venv, default .peer-venv/ beside the repo, git-ignored) with torch (this repo's
pin), trl 0.11.4 and the transformers / peft / accelerate releases it supports (PEER_PACKAGES); built
on first use with pip from the package registry, reused afterwards.

The plan is made here, with the engine's own loaders, so both sides see the same thing: the queries are
what `train.py ppo --max-prompt-length` would draw for each step (PromptLoader, seed 0: distinct
rl-split questions as "<bos>Question: ...\\n\\nAnswer:", shorter than the limit) and the response cap of
each step is the engine's own draw from MIN-MAX (ppo.py: random.Random(row_seed(seed, step))). The peer
runs in a fresh process of the venv's Python, which imports neither this repo nor its engine.

The peer, as StackLLaMA's rl_training.py builds it: AutoModelForCausalLMWithValueHead with LoRA r=16,
α 32, dropout 0.05 on q_proj/v_proj (peft's default for LLaMA), ref_model None (the reference is the
policy with its adapter off), PPOConfig(batch_size 16, mini_batch_size 4, ppo_epochs 4, adaptive KL,
init_kl_coef 0.2, target 6, horizon 10000), fp32, `ppo_trainer.generate` with top_k 0, top_p 1, sampling,
all 16 queries in one generate batch (TRL's default is 4; ours samples the whole batch), stopping at EOS
as the engine does (StackLLaMA's eos_token_id=100_000 never stops). Two differences, both StackLLaMA's
own layout: the reward model is a separate network (--reward-model: a merged RM folder, scored at each
row's last real token), where the engine's RM is an adapter on the policy's base; and TRL computes the
policy and reference forwards together (its "forward" column covers both).

--dtype bf16 loads both of the peer's networks in bfloat16 (`torch_dtype=torch.bfloat16`; peft keeps the
adapters in float32), the way one would run it where bf16 is fast (a CPU with AVX-512 BF16); compare it
with `bench/ppo_step.py --dtypes bf16`, which keeps a bf16 base, float32 adapters and autocast.

Phases per step: generate, reward, forward (TRL's time/ppo/forward_pass: policy + reference + values),
update (time/ppo/optimize_step) and the rest of `step` (advantages, statistics). The first step is a
warm-up and is left out. Prints a table and one JSON line (also appended to --json FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from common import emit_json, length_range  # this script's own bench/common.py (standard library only)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PACKAGES = ("trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1", "datasets==3.1.0",
                 "rich")  # rich: trl 0.11.4 imports it without declaring it


# ---- the peer (runs in the venv's Python: no engine imports) ------------------------------------------

def run_peer(plan_path: str) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    import trl
    import transformers

    with open(plan_path) as f:
        plan = json.load(f)
    if plan["threads"]:
        torch.set_num_threads(plan["threads"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(plan["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lora = LoraConfig(r=plan["lora_r"], lora_alpha=2 * plan["lora_r"], lora_dropout=0.05, bias="none",
                      task_type="CAUSAL_LM")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan["dtype"]]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(plan["model"], peft_config=lora, torch_dtype=dtype)
    config = PPOConfig(batch_size=plan["batch_size"], mini_batch_size=plan["mini_batch_size"],
                       ppo_epochs=plan["ppo_epochs"], gradient_accumulation_steps=1, learning_rate=1.41e-5,
                       adap_kl_ctrl=True, init_kl_coef=0.2, target=6, horizon=10000, seed=0, log_with=None)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        plan["reward_model"], num_labels=1, torch_dtype=dtype).eval()

    @torch.no_grad()
    def score(queries, responses):  # each row's query + response, right-padded, read at its last real token
        rows = [torch.cat([q, r]) for q, r in zip(queries, responses)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        hidden = reward_model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(rows)), mask.sum(1) - 1]
        return list(reward_model.score(last).squeeze(-1).float())

    steps = []
    for step in plan["steps"]:
        queries = [torch.tensor(q) for q in step["queries"]]
        t0 = time.perf_counter()
        responses = trainer.generate(queries, return_prompt=False, batch_size=len(queries),
                                     max_new_tokens=step["max_new_tokens"], do_sample=True, top_k=0, top_p=1.0,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        t1 = time.perf_counter()
        rewards = score(queries, responses)
        t2 = time.perf_counter()
        stats = trainer.step(queries, responses, rewards)
        t3 = time.perf_counter()
        forward, update = stats["time/ppo/forward_pass"], stats["time/ppo/optimize_step"]
        steps.append(dict(generate=t1 - t0, reward=t2 - t1, forward=forward, update=update,
                          step_rest=(t3 - t2) - forward - update, total=t3 - t0,
                          prompt_tokens=sum(len(q) for q in queries), response_tokens=sum(len(r) for r in responses),
                          kl=float(stats["objective/kl"])))
        print(f"trl step {len(steps)}/{len(plan['steps'])}: {t3 - t0:.1f} s (generate {t1 - t0:.1f}, reward "
              f"{t2 - t1:.1f}, forward {forward:.1f}, update {update:.1f}), responses "
              f"{steps[-1]['response_tokens'] / len(queries):.1f} tokens", file=sys.stderr, flush=True)
    with open(plan["result"], "w") as f:
        json.dump(dict(steps=steps, peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                       threads=torch.get_num_threads(), torch=torch.__version__, trl=trl.__version__,
                       transformers=transformers.__version__), f)


# ---- set-up and the plan (this repo's Python) ---------------------------------------------------------

def peer_python(venv: str) -> str:
    """The venv's Python, built on first use."""
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, "peer-ready")):
        return python
    print(f"trl_peer: building {venv} ({', '.join(PEER_PACKAGES)})", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    torch_pin = next(line.strip() for line in open(os.path.join(ROOT, "setup.py")) if '"torch==' in line)
    subprocess.run([python, "-m", "pip", "install", "-q", torch_pin.strip('",'), *PEER_PACKAGES], check=True)
    open(os.path.join(venv, "peer-ready"), "w").close()
    return python


def make_plan(args) -> list[dict]:
    """Each step's queries and response cap, drawn as the engine draws them."""
    sys.path.insert(0, ROOT)
    import train  # noqa: F401  (binds rlhf_engine to this checkout)
    from rlhf_engine.data.loaders import PromptLoader
    from rlhf_engine.data.pairs_io import read_pairs
    from rlhf_engine.engine.training.train_state import row_seed
    from rlhf_engine.engine.weights.builder import resolve_tokenizer
    tok = resolve_tokenizer(args.model, None)
    loader = iter(PromptLoader(read_pairs(args.data), tok, batch_size=args.batch_size,
                               max_length=args.max_prompt_length, seed=0))
    steps = []
    for step in range(args.steps):
        batch = next(loader)
        queries = [row[mask.bool()].tolist() for row, mask in zip(batch.tokens, batch.attention_mask)]
        cap = random.Random(row_seed(0, step)).randint(*args.response_lengths)
        steps.append(dict(queries=queries, max_new_tokens=cap))
    return steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the policy: an HF LLaMA folder the engine wrote (e.g. RUN/sft-merged)")
    ap.add_argument("--reward-model", help="a merged reward-model folder (`train.py merge` of an RM adapter)")
    ap.add_argument("--data", help="pairs whose questions are the queries (the rl split of `train.py prepare`)")
    ap.add_argument("--steps", type=int, default=3, help="PPO steps, the first a warm-up")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--mini-batch-size", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--response-length", default="32-64", help="N, or MIN-MAX for a cap drawn per step")
    ap.add_argument("--max-prompt-length", type=int, default=256, help="queries this long or longer are left out")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the peer's networks' dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--venv", default=os.path.join(ROOT, ".peer-venv"), help="the peer's virtual environment")
    ap.add_argument("--json", help="append the JSON line to this file")
    ap.add_argument("--peer", help=argparse.SUPPRESS)  # internal: run the peer from a plan file
    args = ap.parse_args()
    if args.peer:
        run_peer(args.peer)
        return
    for flag in ("model", "reward_model", "data"):
        if not getattr(args, flag):
            ap.error(f"--{flag.replace('_', '-')} is required")
    for flag, path in (("--model", args.model), ("--reward-model", args.reward_model)):
        if not os.path.exists(os.path.join(path, "config.json")):
            ap.error(f"{flag} {path}: no config.json there (an HF folder the engine wrote is expected)")
    if not os.path.exists(os.path.join(args.data, "pairs.parquet")):
        ap.error(f"--data {args.data}: no pairs.parquet there (the rl split of `train.py prepare`)")
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")
    args.response_lengths = length_range(ap, args.response_length)

    python = peer_python(os.path.abspath(args.venv))
    work = tempfile.mkdtemp(prefix="trl_peer_")
    plan = dict(model=os.path.abspath(args.model), reward_model=os.path.abspath(args.reward_model),
                batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                lora_r=args.lora_r, dtype=args.dtype, threads=args.threads, steps=make_plan(args),
                result=os.path.join(work, "result.json"))
    with open(os.path.join(work, "plan.json"), "w") as f:
        json.dump(plan, f)
    done = subprocess.run([python, os.path.abspath(__file__), "--peer", os.path.join(work, "plan.json")],
                          stdout=sys.stderr, check=False)
    if done.returncode or not os.path.exists(plan["result"]):
        sys.exit(f"trl_peer: the peer failed (exit status {done.returncode}); its output is above")
    with open(plan["result"]) as f:
        result = json.load(f)
    measured = result["steps"][1:]
    n = len(measured)
    phases = {p: sum(s[p] for s in measured) / n for p in ("generate", "reward", "forward", "update", "step_rest")}
    s_per_step = sum(s["total"] for s in measured) / n
    tokens = sum(s["prompt_tokens"] + s["response_tokens"] for s in measured)
    row = dict(bench="trl_peer", model=plan["model"], reward_model=plan["reward_model"], data=args.data,
               batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
               response_length=args.response_length, lora_r=args.lora_r, dtype=args.dtype, s_per_step=s_per_step,
               phase_s=phases, tokens_per_s=tokens / (s_per_step * n),
               prompt_tokens_mean=sum(s["prompt_tokens"] for s in measured) / n / args.batch_size,
               response_tokens_mean=sum(s["response_tokens"] for s in measured) / n / args.batch_size,
               measured_steps=n, **{k: result[k] for k in ("peak_rss_gb", "threads", "torch", "trl", "transformers")})
    print("peer | s/step | generate | reward | forward (policy + ref) | update | rest of step | prompt/resp | peak RSS")
    print(" | ".join(["---"] * 9))
    print(" | ".join([f"TRL {result['trl']} {args.dtype}", f"{s_per_step:.2f}",
                      *(f"{phases[p]:.1f}" for p in ("generate", "reward", "forward", "update", "step_rest")),
                      f"{row['prompt_tokens_mean']:.0f}/{row['response_tokens_mean']:.0f}",
                      f"{result['peak_rss_gb']:.2f} GB"]))
    emit_json([row], args.json)


if __name__ == "__main__":
    main()
