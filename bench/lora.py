"""Peak memory (RSS) of one LoRA training step with the frozen base in fp32, bf16 and 8-bit.

    python bench/lora.py                       # tiny and llama-60m, fp32/bf16/8bit, then the LLaMA-7B estimate
    python bench/lora.py --presets llama-60m --variants 8bit --json out.jsonl

The step: LoRA r=16 (alpha 32, no dropout) on q_proj and v_proj, everything else frozen; batch 2 x seq 256
random tokens; forward through model.model, next-token log-probs with kernels/logprobs.hidden_token_logprobs
(chunked: the [B, T, vocab] logits are never held), loss = -mean, backward, AdamW step on the adapters.
--steps steps are run (default 2: the first also allocates AdamW's state, the second is steady state) and
the peak is over all of them.

Each (preset, variant) runs in a fresh subprocess (`python bench/lora.py --one PRESET VARIANT`), so one
run's allocations cannot hide in another's peak. In that process, RSS is read (from /proc/self/status) at:
  baseline     after `import torch`, the engine imports and a 64x64 warm-up step (lazy library loading)
  after build  after building the model (random init in float32), converting it (bf16: .to(bfloat16);
               8bit: engine.int8.quantize_model), adding LoRA, creating the optimizer; then gc + malloc_trim
  peak step    resource.getrusage(RUSAGE_SELF).ru_maxrss during the steps. The high-water mark is reset
               just before the first step (echo 5 > /proc/self/clear_refs), so the float32 copy made while
               building does not count; if the reset is refused, `peak_reset` is false and the peak may be
               the build's.
The table shows those and the differences: model = after build - baseline, step = peak - after build.

Then an ESTIMATE for LLaMA-7B 8-bit + LoRA, clearly labelled as such (nothing 7B-sized is allocated):
  weights      8-bit bytes/param of llama-7b (bench/memory.py's analytic figure, embedding/norms/lm_head
               float32 as in this run's 8bit variant) x num_params
  adapters     LoRA parameter count x 16 bytes (fp32 weight + grad + AdamW exp_avg + exp_avg_sq)
  activations  (measured llama-60m 8bit step - its adapter term) x (n_layers*dim*seq*batch ratio): assumes
               activation memory scales with n_layers*dim*seq*batch (same seq/batch here, so the ratio is
               n_layers*dim: 32*4096 / (8*512) = 32); the vocab-sized chunked log-prob buffers are fixed in
               size and get scaled too, which overestimates slightly
  runtime      the measured baseline RSS (Python + torch), added once
and compares the total with StackLLaMA's yardstick of about 1.2-1.4 GB per billion parameters (8-bit + LoRA).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("fp32", "bf16", "8bit")


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder
from bench.common import emit_json  # noqa: E402


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark (VmHWM, which ru_maxrss reads)
        return True
    except OSError:
        return False


def trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS so RSS means live memory
    except OSError:
        pass


def run_one(preset: str, variant: str, batch: int, seq: int, r: int, steps: int) -> dict:
    import torch
    sys.path.insert(0, ROOT)
    import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder
    from rlhf_engine.engine.model.config import ModelConfig
    from rlhf_engine.engine.model.int8 import quantize_model
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora, mark_only_lora_trainable
    from rlhf_engine.engine.model.llama import LLaMA
    from rlhf_engine.kernels.logprobs import hidden_token_logprobs
    # Warm the runtime (BLAS/autograd/optimizer code paths load lazily) on a 64x64 toy so `baseline` holds the
    # fixed runtime cost and `model` holds the model, not first-call library loading.
    w = torch.nn.Parameter(torch.randn(64, 64))
    torch.optim.AdamW([w]).step((torch.randn(8, 64) @ w).square().mean().backward())
    del w
    trim()
    baseline = rss_bytes()

    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    model = LLaMA(cfg).init_weights()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant == "8bit":
        quantize_model(model, skip=("lm_head", "score"))
    lcfg = LoRAConfig(r=r, alpha=2.0 * r, dropout=0.0, targets=("q_proj", "v_proj"))
    apply_lora(model, lcfg)
    mark_only_lora_trainable(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, cfg.vocab_size, (batch, seq), generator=g)
    trim()
    after_build = rss_bytes()
    build_peak = maxrss_bytes()
    peak_reset = reset_peak()

    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        hidden = model.model(tokens)
        logp = hidden_token_logprobs(hidden[:, :-1], model.lm_head.weight, tokens[:, 1:])
        loss = -logp.float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        del hidden, logp, loss
    peak = maxrss_bytes()
    return dict(bench="lora", preset=preset, variant=variant, params=cfg.num_params(), lora_params=lora_params,
                lora_r=r, lora_targets=["q_proj", "v_proj"], batch=batch, seq=seq, steps=steps,
                baseline_rss=baseline, after_build_rss=after_build, peak_rss=peak,
                model_rss=after_build - baseline, step_rss=peak - after_build,
                build_peak_rss=build_peak, peak_reset=peak_reset,
                step_s=round(min(times), 3), loss=round(losses[-1], 4),
                torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.machine(), cpu_count=os.cpu_count())


def estimate_7b(m60: dict, r: int, batch: int, seq: int) -> dict:
    sys.path.insert(0, ROOT)
    import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder
    sys.path.insert(0, HERE)
    from memory import analytic  # bench/memory.py

    from rlhf_engine.engine.model.config import ModelConfig
    c60, c7 = ModelConfig.preset(m60["preset"]), ModelConfig.preset("llama-7b")
    a7 = analytic(c7)
    bpp = a7["formats"]["8bit+fp32"]["model_bytes"] / a7["params"]
    weights = bpp * a7["params"]
    lora7 = c7.n_layers * sum(r * (c7.dim + o) for o in (c7.n_heads * c7.head_dim, c7.n_kv_heads * c7.head_dim))
    adapters = 16 * lora7
    act60 = max(m60["step_rss"] - 16 * m60["lora_params"], 0)
    ratio = (c7.n_layers * c7.dim * seq * batch) / (c60.n_layers * c60.dim * m60["seq"] * m60["batch"])
    activations = act60 * ratio
    runtime = m60["baseline_rss"]
    total = weights + adapters + activations + runtime
    from rlhf_engine.kernels.logprobs import CHUNK_BYTES
    fixed = min(3 * CHUNK_BYTES, act60)  # assumption: ~3 [chunk, vocab] float32 buffers (z, logp, grad_z), not scaled
    total_alt = weights + adapters + fixed + (act60 - fixed) * ratio + runtime
    return dict(bench="lora_estimate", preset="llama-7b", variant="8bit", estimate=True, params=a7["params"],
                weight_bytes_per_param=round(bpp, 4), weights_bytes=int(weights), lora_params=lora7,
                adapter_optimizer_bytes=int(adapters), activations_60m_bytes=int(act60),
                activation_scale=ratio, activations_bytes=int(activations), runtime_bytes=runtime,
                total_bytes=int(total), total_gb=round(total / 1e9, 2),
                gb_per_billion_params=round(total / 1e9 / (a7["params"] / 1e9), 3),
                alt_fixed_logprob_bytes=int(fixed), alt_total_gb=round(total_alt / 1e9, 2),
                alt_gb_per_billion_params=round(total_alt / a7["params"], 3),
                weights_adapters_runtime_gb=round((weights + adapters + runtime) / 1e9, 2),
                stackllama_gb_per_billion=[1.2, 1.4],
                stackllama_gb=[round(1.2 * a7["params"] / 1e9, 2), round(1.4 * a7["params"] / 1e9, 2)],
                batch=batch, seq=seq, from_preset=m60["preset"])


def mib(n):
    return f"{n / 2**20:,.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-60m"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.batch, args.seq, args.r, args.steps)))
        return

    rows = []
    for preset in args.presets:
        for variant in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", preset, variant, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--r", str(args.r), "--steps", str(args.steps)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{preset} {variant}: subprocess failed (rc {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))

    print(f"{'preset':<10} {'base':<5} {'LoRA params':>11} {'baseline MiB':>12} {'after build MiB':>15} "
          f"{'peak step MiB':>13} {'model MiB':>9} {'step MiB':>8} {'step s':>6} {'reset':>5}")
    for r in rows:
        print(f"{r['preset']:<10} {r['variant']:<5} {r['lora_params']:>11,} {mib(r['baseline_rss']):>12} "
              f"{mib(r['after_build_rss']):>15} {mib(r['peak_rss']):>13} {mib(r['model_rss']):>9} "
              f"{mib(r['step_rss']):>8} {r['step_s']:>6.2f} {str(r['peak_reset']):>5}")

    out = list(rows)
    src = [r for r in rows if r["variant"] == "8bit" and r["preset"] == "llama-60m"]
    if src:
        e = estimate_7b(src[0], args.r, args.batch, args.seq)
        out.append(e)
        print(f"\nESTIMATE (extrapolated, not measured): LLaMA-7B, 8-bit base + LoRA r={args.r} on q_proj,v_proj, "
              f"batch {args.batch} x seq {args.seq}")
        print(f"  weights      {e['weight_bytes_per_param']:.4f} B/param x {e['params']:,} = {e['weights_bytes'] / 1e9:6.2f} GB")
        print(f"  adapters+opt {e['lora_params']:,} LoRA params x 16 B (w, grad, 2 AdamW moments)"
              f" = {e['adapter_optimizer_bytes'] / 1e9:6.2f} GB")
        print(f"  activations  llama-60m 8bit step {e['activations_60m_bytes'] / 2**20:.1f} MiB (minus its adapters)"
              f" x {e['activation_scale']:.0f} (n_layers*dim*seq*batch ratio) = {e['activations_bytes'] / 1e9:6.2f} GB")
        print(f"  runtime      measured Python+torch baseline RSS = {e['runtime_bytes'] / 1e9:6.2f} GB")
        print(f"  total        ~{e['total_gb']:.2f} GB  = {e['gb_per_billion_params']:.2f} GB per billion params "
              f"(StackLLaMA yardstick 1.2-1.4 GB/B: {e['stackllama_gb'][0]}-{e['stackllama_gb'][1]} GB)")
        print(f"  alt. total   ~{e['alt_total_gb']:.2f} GB = {e['alt_gb_per_billion_params']:.2f} GB/B if the chunked log-prob "
              f"buffers (~3 x CHUNK_BYTES = {e['alt_fixed_logprob_bytes'] / 2**20:.0f} MiB, vocab-sized) are kept fixed")
        print(f"  without activations (weights + adapters + runtime): {e['weights_adapters_runtime_gb']:.2f} GB")
    emit_json(out, args.json)


if __name__ == "__main__":
    main()
