"""Seconds per PPO step and where they go: generate, policy forward, reference forward, reward, update.

StackLLaMA-shaped steps through the engine's own `engine.ppo.train`: 16 queries per step, minibatch 4
(4 optimizer steps per epoch), 4 PPO epochs, LoRA r=16 on q_proj/v_proj, the reference = the policy
with its adapters off, and a reward model of the policy's size (a random scalar-head LLaMA, loaded from
the base checkpoint the way `--reward-model` is) or, with --reward scripted, a function of the token
ids. The response length is fixed (default 64, inside StackLLaMA's 32–128) so runs compare.

    python bench/ppo_step.py                          # tiny and llama-60m, fp32, 6 steps each (~1.5 min quiet)
    python bench/ppo_step.py --presets llama-60m --steps 8 --response-length 128 --mini-batch-size 1
    python bench/ppo_step.py --reward scripted --json out.jsonl
    python bench/ppo_step.py --presets llama-60m --dtypes fp32 bf16 8bit --prompt-tokens 64 --response-length 48
    python bench/ppo_step.py ... --root ../prev     # the same bench on an earlier commit's engine (worktree)
    python bench/ppo_step.py --model RUN/sft-merged --reward-model RUN/rm-reward/checkpoint-N \
        --data RUN/pairs/rl --response-length 32-64   # the real shape: SmolLM2, real queries, an RM adapter

With --model the policy is that checkpoint (README's "StackLLaMA on a laptop" run), the queries come from
--data (<= --max-prompt-length tokens), and --reward-model is an RM adapter on the same base, so the policy,
the reference and the reward model share one frozen network. Real queries differ in length: "pad sampled" is
the padding share of the rows as the sampler lays them out (left-padded prompts, right-padded responses);
the model computes none of it (linears and attention run on the real tokens only).

Everything is built in a scratch folder first: synthetic StackExchange posts (data/synthetic.py) through
`prepare` (the rl split's questions are the queries), a sentencepiece tokenizer trained on that text of
the preset's vocabulary size, and a random base checkpoint. A 32000-piece vocabulary cannot be trained
on the synthetic text, so llama-60m uses LLaMA's tokenizer.model when present (--llama-tokenizer) and
otherwise a 1000-piece synthetic one, which shrinks its LM head; the table's vocab column says which.

Each configuration runs in a fresh subprocess, so its peak RSS (getrusage ru_maxrss) is its own. The
first step is a warm-up and is left out of every average. s/step is the engine's own step time
(tokens / perf/tokens_per_s); "other" is the part no phase timer covers (the exact-KL and gather
bookkeeping after the two rollout forwards). tok/s counts real prompt + response tokens, as the engine
does. The reward model is handed to train() as a reward function (to count each step's tokens), so the
engine's layout line calls it "scripted". Prints a table and one JSON line per configuration (also
appended to --json FILE if given).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--root" in sys.argv:  # the engine under test comes from this checkout (before any engine import)
    ROOT = os.path.abspath(sys.argv[sys.argv.index("--root") + 1])
sys.path.insert(0, ROOT)
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

# This script's own bench/common.py, whatever --root is (an older checkout's may lack a helper).
from common import (add_run_args, emit_json, length_range, preset_base_checkpoint, run_worker,  # noqa: E402
                    synthetic_pairs, tokenizer_for)

LLAMA_TOKENIZER = os.path.join(os.path.dirname(ROOT), "shared", "data", "llama-tokenizer", "tokenizer.model")
PHASES = ("generate", "policy_forward", "reference_forward", "reward", "update")


# ---- setup (parent process) -----------------------------------------------------------------------

# ---- one configuration (child process) ------------------------------------------------------------

def run_config(spec: dict) -> dict:
    """Run PPO for spec["steps"] steps and summarise every step after the first."""
    import torch

    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.training.dist import init_dist
    from rlhf_engine.engine.model.lora import LoRAConfig
    from rlhf_engine.engine.ppo import PPOConfig, train
    from rlhf_engine.engine.rl.reward import reward_model_fn
    from rlhf_engine.engine.model.precision import torch_dtype
    from rlhf_engine.engine.weights.builder import resolve_tokenizer

    eight_bit = spec["dtype"] == "8bit"  # an 8-bit base computing in bf16 around its int8 matmuls
    dtype = "bf16" if eight_bit else spec["dtype"]
    shortest, longest = spec["response_lengths"]  # equal, or the range the cap is drawn from per step
    cfg = PPOConfig(model=spec["base"], data=spec["data"], out=spec["out"], max_steps=spec["steps"],
                    batch_size=spec["batch_size"], mini_batch_size=spec["mini_batch_size"],
                    ppo_epochs=spec["ppo_epochs"], response_min_length=shortest, response_max_length=longest,
                    max_prompt_length=spec["max_prompt_length"], lora=LoRAConfig(r=spec["lora_r"]), dtype=dtype,
                    load_in_8bit=eight_bit, save_every=0, sample_every=0, log_every=1, device="cpu",
                    reward_model=spec["reward_model"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["prompt_tokens"]:  # the exact shape: every query the same length, random token ids
        import rlhf_engine.engine.ppo as ppo_module
        ppo_module.prompt_loader = lambda cfg, dist, tok, max_seq_len, log: RandomPrompts(
            spec["prompt_tokens"], cfg.batch_size * dist.world_size, tok)
    if spec["reward_model"]:  # an adapter on the policy's own base: the engine loads it (one base)
        score = None
    elif spec["reward"] == "model":  # a reward model of the policy's size, as train() would load it
        # Older commits (--root) read the reward at the EOS and take no eos_id.
        eos = {"eos_id": resolve_tokenizer(spec["base"], None).eos_id} if "eos_id" in inspect.signature(
            reward_model_fn).parameters else {}
        score = reward_model_fn(load_checkpoint(spec["base"], head="score", dtype=torch_dtype(dtype)).eval(), **eos)
    else:
        def score(tokens, mask):  # share of even token ids among the real tokens
            return ((tokens % 2 == 0).float() * mask).sum(1) / mask.sum(1)

    history = train(cfg, init_dist("cpu"), reward_fn=score)["history"]
    for h in history:  # an engine before time/step (--root on an older commit): its phases, "other" left out
        h.setdefault("time/step", sum(h[f"time/{p}"] for p in PHASES))
    step_tokens = [round(h["perf/tokens_per_s"] * h["time/step"]) for h in history]  # real prompt + response
    measured = list(zip(history, step_tokens, strict=True))[1:]  # step 0 warms up
    total = sum(h["time/step"] for h, _ in measured)
    phases = {p: sum(h[f"time/{p}"] for h, _ in measured) / total for p in PHASES}
    phases["other"] = 1.0 - sum(phases.values())
    tokens = sum(n for _, n in measured)
    response_tokens = sum(h["env/response_length_mean"] * spec["batch_size"] for h, _ in measured)
    response_mean = response_tokens / len(measured) / spec["batch_size"]
    limit = {k: sum(h.get(f"perf/{k}", float("nan")) for h, _ in measured) / len(measured)  # nan: no report
             for k in ("generate_bandwidth_frac", "score_peak_frac", "update_peak_frac", "padding_share_sampled")}
    return dict(s_per_step=total / len(measured), phase_share=phases, **limit,
                phase_s={p: sum(h[f"time/{p}"] for h, _ in measured) / len(measured) for p in PHASES},
                tokens_per_s=tokens / total, response_tokens_per_s=response_tokens / total,
                prompt_tokens_mean=(tokens - response_tokens) / len(measured) / spec["batch_size"],
                response_tokens_mean=response_mean,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                measured_steps=len(measured), threads=torch.get_num_threads(), torch=torch.__version__)


class RandomPrompts:
    """Batches of `n_tokens` random token ids (BOS first, no special pieces), a fixed seed; no file."""

    def __init__(self, n_tokens: int, batch_size: int, tok):
        import torch
        self.n_tokens, self.batch_size, self.vocab, self.bos = n_tokens, batch_size, tok.vocab_size, tok.bos_id
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self):
        import torch

        from rlhf_engine.data.loaders import QueryBatch
        while True:
            tokens = torch.randint(3, self.vocab, (self.batch_size, self.n_tokens), generator=self.generator)
            tokens[:, 0] = self.bos
            yield QueryBatch(tokens, torch.ones_like(tokens, dtype=torch.bool))

    def state_dict(self) -> dict:
        return {}


# ---- driver ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-60m"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "bf16", "8bit"],
                    help="8bit: an int8 base (--load-in-8bit) computing in bf16")
    ap.add_argument("--steps", type=int, default=6, help="PPO steps per configuration, the first a warm-up")
    ap.add_argument("--batch-size", type=int, default=16, help="queries per PPO step")
    ap.add_argument("--mini-batch-size", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--response-length", default="64", help="response tokens per step: N, or MIN-MAX for a cap "
                    "drawn per step (the real shape: 32-64)")
    ap.add_argument("--model", help="a real checkpoint (HF folder or GGUF file) instead of --presets' random ones")
    ap.add_argument("--data", help="pairs whose questions are the queries (the rl split of `train.py prepare`); "
                    "default: synthetic questions")
    ap.add_argument("--reward-model", help="a reward model for --model: an RM adapter trained on the same base "
                    "shares it (StackLLaMA's layout), as `train.py ppo --reward-model`")
    ap.add_argument("--max-prompt-length", type=int, default=256, help="queries longer than this are left out")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="random prompts of exactly this many tokens "
                    "(0: the synthetic questions); --prompt-tokens 64 --response-length 48 is issue 16's shape")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--reward", choices=["model", "scripted"], default="model",
                    help="a reward model of the policy's size (StackLLaMA), or a function of the token ids")
    ap.add_argument("--root", help="import the engine from this checkout (e.g. a worktree of an earlier commit)")
    add_run_args(ap, LLAMA_TOKENIZER)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker, run_config)
        return
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first is a warm-up)")
    args.response_lengths = length_range(ap, args.response_length)
    if args.reward_model and not args.model:
        ap.error("--reward-model needs --model (an adapter on that base)")

    work = args.workdir or tempfile.mkdtemp(prefix="bench_ppo_")
    os.makedirs(work, exist_ok=True)
    try:
        rows = run_all(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_rows(rows, args.json)


def run_all(args, work: str) -> list[dict]:
    from rlhf_engine.data.tokenizer import Tokenizer
    from rlhf_engine.engine.model.config import ModelConfig
    pairs, texts = synthetic_pairs(work, 1000)
    data = args.data or os.path.join(pairs, "rl")
    rows = []
    for preset in [os.path.basename(args.model.rstrip("/"))] if args.model else args.presets:
        if args.model:  # a real model with its own tokenizer
            base, tok_note, vocab, params = os.path.abspath(args.model), "its own", None, None
        else:
            tok, tok_note = tokenizer_for(ModelConfig.preset(preset).vocab_size, texts, work, args.llama_tokenizer)
            base = preset_base_checkpoint(preset, tok, work)
            vocab = Tokenizer(tok).vocab_size
            params = ModelConfig.preset(preset, vocab_size=vocab).num_params()
        reward = "adapter" if args.reward_model else args.reward
        for dtype in args.dtypes:
            name = f"{preset}-{dtype}"
            out = os.path.join(work, "runs", name)
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            spec = dict(base=base, data=data, out=out, steps=args.steps, batch_size=args.batch_size,
                        mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                        response_lengths=args.response_lengths, lora_r=args.lora_r, dtype=dtype,
                        reward=reward, threads=args.threads, prompt_tokens=args.prompt_tokens,
                        max_prompt_length=args.max_prompt_length,
                        reward_model=os.path.abspath(args.reward_model) if args.reward_model else None,
                        result=os.path.join(out, "result.json"))
            with open(os.path.join(out, "spec.json"), "w") as f:
                json.dump(spec, f)
            print(f"== {name}: {args.steps} PPO steps", file=sys.stderr, flush=True)
            # The engine's per-step lines go to stderr so stdout holds only the table and JSON.
            root = ["--root", ROOT] if args.root else []
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                   os.path.join(out, "spec.json"), *root], stdout=sys.stderr, check=False)
            result = {"error": f"exit status {done.returncode}"}
            if os.path.exists(spec["result"]):
                with open(spec["result"]) as f:
                    result = json.load(f)
            rows.append(dict(bench="ppo_step", engine=ROOT, preset=preset, dtype=dtype, params=params, vocab=vocab,
                             tokenizer=tok_note, reward=reward, batch_size=args.batch_size,
                             mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                             response_length=args.response_length, lora_r=args.lora_r, data=data,
                             lora_targets=["q_proj", "v_proj"], **result,
                             machine=platform.machine(), cpu_count=os.cpu_count()))
    return rows


def print_rows(rows: list[dict], json_path: str | None) -> None:
    head = ["config", "params", "vocab", "s/step", *("gen", "policy", "ref", "reward", "update", "other"),
            "tok/s", "resp tok/s", "prompt/resp", "peak RSS", "update/peak", "score/peak", "decode/bw",
            "pad sampled"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        if "error" in r:
            print(f"{r['preset']} {r['dtype']} | failed: {r['error']}")
            continue
        shares = [f"{100 * r['phase_share'][p]:.0f}%" for p in (*PHASES, "other")]
        print(" | ".join([f"{r['preset']} {r['dtype']}", f"{r['params'] / 1e6:.1f}M" if r["params"] else "-",
                          f"{r['vocab'] or '-'}", f"{r['s_per_step']:.2f}", *shares, f"{r['tokens_per_s']:,.0f}",
                          f"{r['response_tokens_per_s']:,.0f}",
                          f"{r['prompt_tokens_mean']:.0f}/{r.get('response_tokens_mean', float('nan')):.0f}",
                          f"{r['peak_rss_gb']:.2f} GB",
                          *(f"{100 * r.get(k, float('nan')):.0f}%" for k in (
                              "update_peak_frac", "score_peak_frac", "generate_bandwidth_frac",
                              "padding_share_sampled"))]))
    for r in [r for r in rows if "error" not in r][:1]:
        print(f"{r['batch_size']} queries, minibatch {r['mini_batch_size']}, {r['ppo_epochs']} PPO epochs, response "
              f"{r['response_length']} tokens, LoRA r={r['lora_r']} on q_proj/v_proj, reward {r['reward']}, "
              f"queries from {r['data']}, "
              f"{r['threads']} threads, {r['measured_steps']} steps measured after a warm-up step")
    notes = {r["tokenizer"] for r in rows if r["tokenizer"] not in ("llama", "synthetic", "its own")}
    for note in notes:
        print(f"note: tokenizer {note}; LLaMA's tokenizer.model was not found")
    emit_json(rows, json_path)


if __name__ == "__main__":
    main()
