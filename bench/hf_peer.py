"""SFT and RM training steps and sampled decode on the real model, the engine beside transformers + peft
(issue 23, points 2 and 5): the same checkpoint, the same batch shapes, the same token ids.

    python bench/hf_peer.py --model RUN/sft-merged                     # all of it, ~15 min quiet
    python bench/hf_peer.py --model RUN/sft-merged --parts decode --decode-batch 16

Each configuration runs twice in fresh processes: the engine in this repo's Python, the peer in the venv
bench/trl_peer.py builds (--venv, default .peer-venv/: transformers 4.46.3, peft 0.13.2, torch from this
repo's pin), which imports nothing from this repo. Peak RSS (getrusage) is each process's own.

- sft-lora / sft-full: one optimizer step on --batch-size rows of --seq-len tokens (random ids of the
  model's vocabulary, no padding: a packed batch), next-token loss; LoRA r=16, α 32, dropout 0.05 on
  q_proj/v_proj (StackLLaMA's), or every weight trained; AdamW (the engine's fused one; torch's default
  for the peer, as its Trainer would pick). The engine's loss runs the LM head in chunks
  (kernels/logprobs.py); the peer's is `model(input_ids, labels=...)`.
- rm-lora: a sequence-classification model (one score) with the same LoRA plus its trainable score
  head, --batch-size rows as --batch-size/2 pairs, loss -log σ(chosen - rejected).
- decode: --decode-batch rows of --prompt-len token prompts, --new-tokens sampled at temperature 1 with
  no early stop (the engine: EOS never sampled as a stop; the peer: min_new_tokens = max_new_tokens);
  tokens/s counts the new tokens over the whole call (prefill included), the best of --repeats calls.
Training steps: --steps, the first a warm-up left out; tokens/s is rows x seq-len over the mean step.
--compile: both sides run their training step's module through torch.compile (the engine's loss module as
`train.py sft/rm --compile` does, the peer's whole model); the compile falls in the warm-up; decode stays eager.
--dtype bf16 (for a CPU with AVX-512 BF16, where it is each side's fastest dtype): the frozen base is stored
in bf16 and the trained tensors stay float32 (LoRA's adapters, the score head; every weight in sft-full), and
each training step runs under torch.autocast(bf16), on both sides: the engine as `train.py sft/rm --dtype
bf16` builds it, the peer loaded with torch_dtype=bfloat16 (peft keeps the adapters in float32; sft-full
loads float32) under autocast, as a Trainer with bf16=True would run it. Decode: both models in bf16.
Prints a table and one JSON line per configuration and side (also appended to --json FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import emit_json  # (this script's own bench/common.py, standard library only)
from trl_peer import peer_python  # (the peer's venv, built on first use)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("sft-lora", "sft-full", "rm-lora", "decode")


def batches(spec: dict, vocab: int):
    import torch
    g = torch.Generator().manual_seed(0)
    return [torch.randint(100, vocab, (spec["batch_size"], spec["seq_len"]), generator=g) for _ in range(spec["steps"])]


def time_steps(step, data) -> list[float]:
    times = []
    for tokens in data:
        t = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - t)
    return times


def run_engine(spec: dict) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    import train  # noqa: F401  (binds rlhf_engine to this checkout)
    from rlhf_engine.engine.model.generate import SamplingConfig, generate
    from rlhf_engine.engine.model.lora import LoRAConfig
    from rlhf_engine.engine.model.precision import autocast
    from rlhf_engine.engine.rl.reward import PairScores
    from rlhf_engine.engine.rl.rlhf_math import pairwise_loss
    from rlhf_engine.engine.sft import CausalLMLoss
    from rlhf_engine.engine.training.optim import build_adamw
    from rlhf_engine.engine.weights.builder import build_model, resolve_tokenizer
    tok = resolve_tokenizer(spec["model"], None)
    part = spec["part"]
    lora = None if part == "sft-full" else LoRAConfig(r=16, alpha=32, dropout=0.05, targets=("q_proj", "v_proj"))
    head = "score" if part == "rm-lora" else "lm"
    model = build_model(spec["model"], tok, head=head, dtype=spec["dtype"], lora=None if part == "decode" else lora)
    bf16 = autocast(torch.device("cpu"), spec["dtype"])  # a no-op for fp32
    if part == "decode":
        model.to(torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32)
        prompts = batches(dict(spec, batch_size=spec["decode_batch"], seq_len=spec["prompt_len"], steps=1),
                          model.cfg.vocab_size)[0].tolist()
        cfg = SamplingConfig(max_new_tokens=spec["new_tokens"], temperature=1.0, seed=0)
        model.eval()

        def call():
            t = time.perf_counter()
            with bf16:
                out = generate(model, prompts, cfg, eos_id=-1, pad_id=tok.pad_id)
            assert int(out.response_mask.sum()) == len(prompts) * spec["new_tokens"]
            return time.perf_counter() - t
        return dict(seconds=min(call() for _ in range(spec["repeats"] + 1)))
    model.train()
    optimizer = build_adamw(model, 1e-5, 0.0)
    net = PairScores(model) if head == "score" else CausalLMLoss(model)
    if spec["compile"]:
        net = torch.compile(net)

    def step(tokens):
        optimizer.zero_grad(set_to_none=True)
        with bf16:
            if head == "score":
                scores = net(tokens, torch.ones_like(tokens))
                n = len(tokens) // 2
                loss = pairwise_loss(scores[:n].float(), scores[n:].float())[0]
            else:
                loss = net(tokens[:, :-1], tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        optimizer.step()
    return dict(step_seconds=time_steps(step, batches(spec, model.cfg.vocab_size)))


def run_peer(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(spec["model"])
    part = spec["part"]
    bf16 = spec["dtype"] == "bf16"
    # the frozen base in bf16 where it is frozen; full fine-tuning keeps float32 masters (autocast computes in bf16)
    dtype = torch.bfloat16 if bf16 and part != "sft-full" else torch.float32
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", target_modules=["q_proj", "v_proj"],
                      task_type="SEQ_CLS" if part == "rm-lora" else "CAUSAL_LM")
    if part == "rm-lora":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1,
                                                                   torch_dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model.score.float()  # the head trains: float32, as the engine keeps it
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=dtype)
    vocab = model.config.vocab_size
    if part == "decode":
        model.eval()
        prompts = batches(dict(spec, batch_size=spec["decode_batch"], seq_len=spec["prompt_len"], steps=1), vocab)[0]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def call():
            torch.manual_seed(0)
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                                     top_p=1.0, max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                     pad_token_id=pad)
            assert out.shape[1] == spec["prompt_len"] + spec["new_tokens"]
            return time.perf_counter() - t
        return dict(seconds=min(call() for _ in range(spec["repeats"] + 1)))
    if part != "sft-full":
        model = get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    if spec["compile"]:
        model = torch.compile(model)

    def step(tokens):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if part == "rm-lora":
                scores = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[:, 0].float()
                n = len(tokens) // 2
                loss = -F.logsigmoid(scores[:n] - scores[n:]).mean()
            else:
                loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
    return dict(step_seconds=time_steps(step, batches(spec, vocab)))


def worker(spec_path: str, side: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    result = (run_engine if side == "engine" else run_peer)(spec)
    result.update(peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF LLaMA folder the engine wrote (e.g. RUN/sft-merged)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4, help="rows per training step (rm: half as many pairs)")
    ap.add_argument("--steps", type=int, default=4, help="training steps, the first a warm-up")
    ap.add_argument("--decode-batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="decode: timed calls after a warm-up call")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="both sides' compute dtype (bf16: a bf16 frozen base and autocast)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides' training steps")
    ap.add_argument("--venv", default=os.path.join(ROOT, ".peer-venv"), help="the peer's virtual environment")
    ap.add_argument("--json", help="append the JSON lines to this file")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # internal: SPEC SIDE
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if not args.model:
        ap.error("--model is required")
    if not os.path.exists(os.path.join(args.model, "config.json")):
        ap.error(f"--model {args.model}: no config.json there (an HF folder the engine wrote is expected)")
    if args.steps < 2 or args.batch_size < 2 or args.batch_size % 2:
        ap.error("--steps must be at least 2 (the first is a warm-up) and --batch-size even and at least 2")
    pythons = {"engine": sys.executable, "peer": peer_python(os.path.abspath(args.venv))}
    work = tempfile.mkdtemp(prefix="hf_peer_")
    rows = []
    for part in args.parts:
        for side in ("engine", "peer"):
            spec = dict(model=os.path.abspath(args.model), part=part, seq_len=args.seq_len, batch_size=args.batch_size,
                        steps=args.steps, decode_batch=args.decode_batch, prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, dtype=args.dtype,
                        compile=args.compile and part != "decode",
                        result=os.path.join(work, f"{part}-{side}.json"))
            with open(os.path.join(work, f"{part}-{side}.spec.json"), "w") as f:
                json.dump(spec, f)
            print(f"== {part}: {side}", file=sys.stderr, flush=True)
            done = subprocess.run([pythons[side], os.path.abspath(__file__), "--worker",
                                   os.path.join(work, f"{part}-{side}.spec.json"), side], check=False)
            if done.returncode or not os.path.exists(spec["result"]):
                rows.append(dict(bench="hf_peer", part=part, side=side, error=f"exit status {done.returncode}"))
                continue
            with open(spec["result"]) as f:
                result = json.load(f)
            if part == "decode":
                tokens, seconds = args.decode_batch * args.new_tokens, result.pop("seconds")
            else:
                measured = result.pop("step_seconds")[1:]
                tokens, seconds = args.batch_size * args.seq_len, sum(measured) / len(measured)
            rows.append(dict(bench="hf_peer", part=part, side=side, model=spec["model"], seconds=seconds,
                             tokens_per_s=tokens / seconds, seq_len=args.seq_len, batch_size=args.batch_size,
                             decode_batch=args.decode_batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                             compiled=spec["compile"], dtype=args.dtype, **result))
    print("part | engine tok/s | peer tok/s | engine / peer | engine peak RSS | peer peak RSS")
    print(" | ".join(["---"] * 6))
    for part in args.parts:
        got = {r["side"]: r for r in rows if r["part"] == part}
        if any("error" in got.get(s, {"error": 1}) for s in ("engine", "peer")):
            print(f"{part} | failed: {got}")
            continue
        e, p = got["engine"], got["peer"]
        label = part + (" (compiled)" if e["compiled"] else "") + (f" {args.dtype}" if args.dtype != "fp32" else "")
        print(" | ".join([label, f"{e['tokens_per_s']:,.0f}", f"{p['tokens_per_s']:,.0f}",
                          f"{e['tokens_per_s'] / p['tokens_per_s']:.2f}x", f"{e['peak_rss_gb']:.2f} GB",
                          f"{p['peak_rss_gb']:.2f} GB"]))
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
