"""Bytes per parameter of the model weights in fp32, bf16 and 8-bit (engine.int8.quantize_model).

    python bench/memory.py                                  # tiny, llama-60m (measured) and llama-7b (analytic)
    python bench/memory.py --presets tiny llama-60m llama-7b --json out.jsonl

Sizes are tensor sizes: sum of numel * element_size over the state dict (tied tensors counted once), not
process RSS (see bench/lora.py for that). Per-parameter figures divide by the float model's parameter count
(cfg.num_params()), so the 8-bit figures include the float32 `weight_scale` rows as overhead.

8-bit quantises every nn.Linear except lm_head (as bitsandbytes/StackLLaMA do); the embedding, the RMSNorm
gains and lm_head stay in float: `8bit+fp32` keeps them float32 (quantize_model on a float32 model),
`8bit+bf16` casts them to bfloat16 (model.to(bfloat16) after quantising; the scales stay float32).
Two columns: `linears` (the quantised linears alone: int8 weight + float32 scale) and `model` (everything).

Presets up to --measure-max parameters are built for real (LLaMA(cfg) with random weights) and measured;
bigger ones (llama-7b) are computed from the config shapes without allocating anything. For the measured
presets the analytic figure is computed too and checked to agree to the byte.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from bench.common import emit_json  # noqa: E402
from rlhf_engine.engine.model.config import ModelConfig  # noqa: E402
from rlhf_engine.engine.model.llama import LLaMA  # noqa: E402

FORMATS = ("fp32", "bf16", "8bit+fp32", "8bit+bf16")
LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- analytic (from config shapes) -------------------------------------------------------------

def linear_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every linear that quantize_model turns into Int8Linear (all but lm_head)."""
    hd = cfg.head_dim
    per_layer = [(cfg.n_heads * hd, cfg.dim), (cfg.n_kv_heads * hd, cfg.dim), (cfg.n_kv_heads * hd, cfg.dim),
                 (cfg.dim, cfg.n_heads * hd), (cfg.hidden_dim, cfg.dim), (cfg.hidden_dim, cfg.dim),
                 (cfg.dim, cfg.hidden_dim)]
    return per_layer * cfg.n_layers


def analytic(cfg: ModelConfig) -> dict:
    """Bytes per format, for the linears alone and for the whole model."""
    shapes = linear_shapes(cfg)
    lin_params = sum(o * i for o, i in shapes)
    lin_rows = sum(o for o, _ in shapes)
    total = cfg.num_params()
    rest = total - lin_params  # embedding, norms, lm_head (tied: counted once by num_params)
    out = {}
    for fmt in FORMATS:
        if fmt in ("fp32", "bf16"):
            b = 4 if fmt == "fp32" else 2
            out[fmt] = dict(linear_bytes=lin_params * b, model_bytes=total * b)
        else:
            float_b = 4 if fmt.endswith("fp32") else 2
            lin = lin_params * 1 + lin_rows * 4  # int8 weight + float32 weight_scale per output row
            out[fmt] = dict(linear_bytes=lin, model_bytes=lin + rest * float_b)
    return dict(params=total, linear_params=lin_params, formats=out)


# ---- measured (real model) ---------------------------------------------------------------------

def state_bytes(module: torch.nn.Module, only=None) -> int:
    seen, n = set(), 0
    for name, t in module.state_dict(keep_vars=True).items():
        if only is not None and not only(name):
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:  # tied embeddings: one tensor under two names
            continue
        seen.add(key)
        n += t.numel() * t.element_size()
    return n


def is_linear_key(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in LINEAR_LEAVES


def measure(cfg: ModelConfig) -> dict:
    from rlhf_engine.engine.model.int8 import quantize_model
    out = {}
    for fmt in FORMATS:
        torch.manual_seed(0)
        model = LLaMA(cfg).init_weights()
        if fmt == "bf16":
            model = model.to(torch.bfloat16)
        elif fmt.startswith("8bit"):
            quantize_model(model, skip=("lm_head", "score"))
            if fmt.endswith("bf16"):
                model = model.to(torch.bfloat16)
            # sanity: the quantised linears really are int8 with float32 scales
            sd = model.state_dict()
            k = "model.layers.0.self_attn.q_proj"
            if k + ".weight" in sd:
                assert sd[k + ".weight"].dtype == torch.int8, sd[k + ".weight"].dtype
                assert sd[k + ".weight_scale"].dtype == torch.float32, sd[k + ".weight_scale"].dtype
        out[fmt] = dict(linear_bytes=state_bytes(model, is_linear_key), model_bytes=state_bytes(model))
        del model
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "llama-60m", "llama-7b"])
    ap.add_argument("--measure-max", type=float, default=5e8,
                    help="build and measure presets up to this many parameters; compute bigger ones analytically")
    ap.add_argument("--json", help="append the JSON lines to this file")
    args = ap.parse_args()

    rows = []
    for preset in args.presets:
        cfg = ModelConfig.preset(preset)
        a = analytic(cfg)
        measured = cfg.num_params() <= args.measure_max
        m = measure(cfg) if measured else None
        for fmt in FORMATS:
            src = m[fmt] if measured else a["formats"][fmt]
            agrees = (m[fmt] == a["formats"][fmt]) if measured else None
            rows.append(dict(bench="memory", preset=preset, format=fmt, method="measured" if measured else "analytic",
                             params=a["params"], linear_params=a["linear_params"],
                             linear_share=round(a["linear_params"] / a["params"], 4),
                             linear_bytes=src["linear_bytes"], model_bytes=src["model_bytes"],
                             linear_bytes_per_param=round(src["linear_bytes"] / a["linear_params"], 4),
                             model_bytes_per_param=round(src["model_bytes"] / a["params"], 4),
                             model_gib=round(src["model_bytes"] / 2**30, 4),
                             analytic_agrees=agrees,
                             torch=torch.__version__, threads=torch.get_num_threads(),
                             machine=platform.machine(), cpu_count=os.cpu_count()))

    print(f"{'preset':<10} {'params':>14} {'linear %':>8} {'format':<10} {'method':<9} "
          f"{'linears B/param':>15} {'model B/param':>13} {'model size':>12} {'analytic==':>10}")
    for r in rows:
        size = f"{r['model_bytes'] / 2**30:.3f} GiB" if r['model_bytes'] > 2**30 else f"{r['model_bytes'] / 2**20:.2f} MiB"
        print(f"{r['preset']:<10} {r['params']:>14,} {100 * r['linear_share']:>7.1f}% {r['format']:<10} "
              f"{r['method']:<9} {r['linear_bytes_per_param']:>15.4f} {r['model_bytes_per_param']:>13.4f} "
              f"{size:>12} {str(r['analytic_agrees']) if r['analytic_agrees'] is not None else '-':>10}")
    bad = [r for r in rows if r["format"].startswith("8bit") and r["linear_bytes_per_param"] > 1.15]
    print(f"8-bit linears <= 1.15 bytes/param (incl. float32 scales): {'yes' if not bad else 'NO: ' + str([(r['preset'], r['linear_bytes_per_param']) for r in bad])}")
    emit_json(rows, args.json)


if __name__ == "__main__":
    main()
