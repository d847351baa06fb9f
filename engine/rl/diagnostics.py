"""PPO diagnostics the anchors lack: reward and length statistics split by how responses ended,
negative-KL tokens by token type, the share of repeated tokens, a sample table, and warnings for the
known failure modes (negative mean KL; reward rising while response diversity collapses, the blog's
"```" hack).

All statistics are over the global batch (ranks reduce their named sums); only rank 0 writes them.
"""
from __future__ import annotations

import torch

from rlhf_engine.engine.training import roofline
from rlhf_engine.engine.training.dist import Dist, all_gather_objects, all_reduce_max, all_reduce_named
from rlhf_engine.engine.rl.rlhf_math import kl_estimate, masked_sum

KINDS = ("word", "punctuation", "whitespace", "digit", "special/byte")


def token_kind(piece: str) -> str:
    """Coarse type of a vocabulary entry (sentencepiece's ▁ or byte-level BPE's Ġ/Ċ for a space/newline),
    to see where negative KL concentrates."""
    text = piece.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n").replace("\u0109", "\t")
    if piece.startswith("<") and piece.endswith(">"):
        return "special/byte"
    if not text.strip():
        return "whitespace"
    if text.strip().isdigit():
        return "digit"
    if all(not c.isalnum() for c in text.strip()):
        return "punctuation"
    return "word"


def repeated_token_share(tokens: torch.Tensor, response_mask: torch.Tensor) -> float:
    """Share of response tokens equal to the token before them: high values flag degenerate loops
    (the blog's "```" reward hack). Local to this rank's rows."""
    same = (tokens[:, 1:] == tokens[:, :-1]) & response_mask[:, 1:].bool() & response_mask[:, :-1].bool()
    return same.sum().item() / max(1, response_mask[:, 1:].sum().item())


def reward_metrics(dist: Dist, raw: torch.Tensor, shaped: torch.Tensor, ended: torch.Tensor) -> dict:
    raw, shaped, e = raw.double(), shaped.double(), ended.double()
    s = all_reduce_named(dist, {"raw": raw.sum(), "raw_sq": (raw * raw).sum(), "n": raw.new_tensor(raw.numel()),
                                "shaped": shaped.sum(), "raw_ended": (raw * e).sum(), "ended": e.sum(),
                                "raw_truncated": (raw * (1 - e)).sum(), "truncated": (1 - e).sum()})
    n = max(s["n"], 1.0)
    mean = s["raw"] / n
    scores = torch.cat([torch.as_tensor(x) for x in all_gather_objects(dist, raw.cpu())])
    return {"env/reward_mean": mean, "env/reward_std": max(s["raw_sq"] / n - mean ** 2, 0.0) ** 0.5,
            "env/reward_min": scores.min().item(), "env/reward_max": scores.max().item(),
            "env/shaped_reward_mean": s["shaped"] / n,
            "env/reward_mean_ended": s["raw_ended"] / s["ended"] if s["ended"] > 0 else float("nan"),
            "env/reward_mean_truncated": s["raw_truncated"] / s["truncated"] if s["truncated"] > 0 else float("nan"),
            "env/reward_dist": scores}


def length_metrics(dist: Dist, lengths: torch.Tensor, ended: torch.Tensor) -> dict:
    s = all_reduce_named(dist, {"tokens": lengths.double().sum(), "rows": lengths.new_tensor(lengths.numel()).double(),
                                "ended": ended.double().sum()})
    return {"env/response_length_mean": s["tokens"] / s["rows"],
            "env/response_length_min": -all_reduce_max(dist, -lengths.min().double()).item(),
            "env/response_length_max": all_reduce_max(dist, lengths.max().double()).item(),
            "env/eos_fraction": s["ended"] / s["rows"]}


def negative_kl_metrics(dist: Dist, log_ratio: torch.Tensor, response_mask: torch.Tensor, tokens: torch.Tensor,
                        tok) -> dict:
    """How many response tokens have log π − log π_ref < 0 (k1 negative), and their share by token type."""
    negative = (log_ratio < 0) & response_mask.bool()
    counts = {kind: 0.0 for kind in KINDS}
    for token in tokens[negative].tolist():
        counts[token_kind(tok.piece(token))] += 1
    counts = all_reduce_named(dist, {**{k: torch.tensor(v, dtype=torch.float64, device=tokens.device)
                                        for k, v in counts.items()},
                                     "tokens": response_mask.sum().double()})
    total_negative = sum(counts[kind] for kind in KINDS)
    out = {"objective/negative_kl_tokens": total_negative,
           "objective/negative_kl_share": total_negative / max(counts["tokens"], 1.0)}
    for kind in KINDS:
        out[f"objective/negative_kl_by_type/{kind.replace('/', '_')}"] = counts[kind] / max(total_negative, 1.0)
    return out


# How far the sampler's log-probs may sit from the trainer's before PPO warns (docs/ON_POLICY.md). The
# sampler decodes one token at a time against a KV cache, the trainer runs one forward over the whole
# row: the same sums reduced in another order and shape, which moves fp32 log-probs by ~1e-6 and bf16
# ones (8 mantissa bits, and the sampler and trainer round at different places) by ~1e-2. On CUDA,
# fp32 matmuls may run in TF32. Anything far above these is a different policy, not round-off.
SAMPLER_TOLERANCE = {("cpu", "fp32"): 1e-4, ("cpu", "bf16"): 0.25, ("cuda", "fp32"): 1e-2, ("cuda", "bf16"): 0.25}


def sampler_tolerance(device: torch.device, dtype: str) -> float:
    return SAMPLER_TOLERANCE.get((device.type, dtype), SAMPLER_TOLERANCE[("cuda", dtype)])


def first_minibatch_tolerance(device: torch.device, dtype: str, deterministic: bool) -> float:
    """How far the first minibatch's log ratio may be from 0: exactly 0 where the rollout's scoring and
    the update run the same deterministic kernels on the same rows (CPU, or --deterministic); on CUDA
    otherwise kernels may reduce in a different order from call to call, so a round-off band is allowed."""
    if device.type == "cpu" or deterministic:
        return 0.0
    return 1e-5 if dtype == "fp32" else 1e-3


def onpolicy_metrics(dist: Dist, sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     response_mask: torch.Tensor, cliprange: float) -> dict:
    """How far the policy the sampler drew from is from the policy the update scores, over real response
    tokens [B, R]: |Δ| mean and max with Δ = log π_trainer − log π_sampler, the mean over responses of
    exp(Σ Δ) (1 when they agree), and the share of tokens whose ratio exp(Δ) alone leaves PPO's clip band."""
    delta = (trainer_logprobs.double() - sampler_logprobs.double()) * response_mask
    outside = ((delta.exp() < 1 - cliprange) | (delta.exp() > 1 + cliprange)) & response_mask.bool()
    s = all_reduce_named(dist, {"abs": delta.abs().sum(), "tokens": response_mask.double().sum(),
                                "seq_ratio": delta.sum(1).exp().sum(), "rows": delta.new_tensor(delta.shape[0]),
                                "outside": outside.double().sum()})
    tokens = max(s["tokens"], 1.0)
    return {"onpolicy/logprob_diff_mean": s["abs"] / tokens,
            "onpolicy/logprob_diff_max": all_reduce_max(dist, delta.abs().max()).item(),
            "onpolicy/seq_prob_ratio": s["seq_ratio"] / max(s["rows"], 1.0),
            "onpolicy/outside_clip_share": s["outside"] / tokens}


def onpolicy_warning(log, step: int, metrics: dict, history: list[dict], tolerance: float, every: int) -> None:
    """Warn when the sampler and the trainer disagree beyond round-off: at the first such step, then every
    `every` such steps (a persistent gap would otherwise flood the log)."""
    if metrics["onpolicy/logprob_diff_max"] <= tolerance:
        return
    earlier = sum(h.get("onpolicy/logprob_diff_max", 0.0) > tolerance for h in history)
    if earlier % every == 0:
        log.warn(f"ppo: step {step}: the sampler's log-probs differ from the trainer's by up to "
                 f"{metrics['onpolicy/logprob_diff_max']:.2e} (tolerance {tolerance:g}): the samples may come from "
                 "another policy than the one being trained (stale adapter? different dtype?); see "
                 "docs/ON_POLICY.md and run train.py check")


def warnings(log, step: int, metrics: dict, history: list[dict], window: int = 5, tolerance: float = 1e-2,
             z: float = 3.0) -> None:
    """Warn about the known failure modes. k1 is unbiased but noisy, so a slightly negative batch mean is
    sampling noise: the negative-KL alarm needs the mean `z` standard errors below 0, and beyond the
    rounding `tolerance` (nats per response) of a policy still equal to its reference."""
    k1, stderr = metrics["objective/kl_k1"], metrics["objective/kl_k1_stderr"]
    if k1 < -tolerance and k1 < -z * stderr:
        log.warn(f"ppo: step {step}: mean k1 KL is negative ({k1:.3f}, {-k1 / max(stderr, 1e-12):.1f} standard "
                 f"errors below 0) while the exact KL is {metrics['objective/kl_full']:.3f}: the policy may be "
                 "exploiting k1's negative samples; check the reference (adapters off) and consider "
                 "--kl-estimator k3 or full")
    if len(history) >= window:
        past = history[-window]
        rising = metrics["env/reward_mean"] > past["env/reward_mean"]
        collapsing = metrics["env/repeated_token_share"] > max(0.3, 2 * past["env/repeated_token_share"])
        if rising and collapsing:
            log.warn(f"ppo: step {step}: reward rises while {metrics['env/repeated_token_share']:.0%} of response "
                     "tokens repeat the previous one: likely reward hacking by degenerate repetition")


def sample_table(tok, rollout, scores: torch.Tensor, n: int = 4) -> str:
    """Markdown table of a few query / response / reward samples (TensorBoard renders it)."""
    rows = ["| query | response | reward |", "| --- | --- | --- |"]
    P = rollout.prompt_len
    for i in range(min(n, rollout.tokens.shape[0])):
        query = tok.decode(rollout.tokens[i, :P][rollout.attention_mask[i, :P].bool()].tolist())
        response = tok.decode(rollout.tokens[i, P:][rollout.response_mask[i].bool()].tolist())
        cell = lambda s: s.replace("|", "\\|").replace("\n", " ")[:300]  # noqa: E731
        rows.append(f"| {cell(query)} | {cell(response)} | {scores[i].item():.3f} |")
    return "\n".join(rows)


def kl_per_response(dist: Dist, rollout) -> dict[str, float]:
    """Mean KL per response over the global batch, by every estimator (the one in use drives β)."""
    per_row = {name: masked_sum(kl_estimate(rollout.logprobs, rollout.ref_logprobs, name), rollout.response_mask, 1)
               for name in ("k1", "k2", "k3")}
    per_row["full"] = masked_sum(rollout.kl_full, rollout.response_mask, 1)
    total = all_reduce_named(dist, {name: kl.mean() for name, kl in per_row.items()})
    k1 = per_row["k1"].double()  # its spread over responses: is a negative mean more than noise?
    spread = all_reduce_named(dist, {"sq": (k1 * k1).sum(), "n": k1.new_tensor(k1.numel())})
    mean = total["k1"] / dist.world_size
    var = max(spread["sq"] / max(spread["n"], 1.0) - mean ** 2, 0.0)
    return {**{name: value / dist.world_size for name, value in total.items()},
            "k1_stderr": (var / max(spread["n"], 1.0)) ** 0.5}


def kl_verdict(kl: float, target: float, adaptive: bool = True) -> str:
    """A word on a KL against the controller's target: within a factor 1.5 is near it."""
    if kl > 1.5 * target:
        return f"above its target of {target:g}: " + ("β is rising to pull it back" if adaptive else
                                                       "β is fixed (--no-adaptive-kl), so nothing pulls it back")
    if kl < target / 1.5:
        return f"below its target of {target:g}: " + ("β is falling, the policy may move further" if adaptive else
                                                       "β is fixed (--no-adaptive-kl)")
    return f"near its target of {target:g}"


def closing_summary(cfg, history: list[dict], kl_coef: float, saved: str | None) -> list[str]:
    """What a PPO run did and what to do next: reward, KL against its target, β, where the adapter is,
    how to try it and how to go on."""
    if not history:
        return []
    k = max(1, min(5, len(history) // 4))
    mean = lambda key, rows: sum(h[key] for h in rows) / len(rows)  # noqa: E731
    kl = mean("objective/kl", history[-k:])
    lines = [f"ppo: reward {mean('env/reward_mean', history[:k]):.3f} over the first {k} steps -> "
             f"{mean('env/reward_mean', history[-k:]):.3f} over the last {k}; KL {kl:.2f} nats per response, "
             f"{kl_verdict(kl, cfg.kl_target, cfg.adaptive_kl)}; β {kl_coef:.3f}"]
    if saved:
        lines += [f"ppo: saved the policy's adapter in {saved} (on the base {cfg.model})",
                  f"ppo: try it: python train.py generate --model {cfg.model} --adapter {saved} --prompt "
                  "'Question: ...' --max-new-tokens 128",
                  f"ppo: go on: the same command with --resume auto --max-steps {cfg.max_steps * 2}"]
    return lines


def step_report(cfg, policy, rollout, update_seconds: float, minibatches_run: int) -> roofline.StepReport:
    """This rank's step against the machine's measured limits (engine/training/roofline.py): generate against memory
    bandwidth, the scoring forwards and the update against the matmul peak of the base's dtype."""
    peaks = roofline.measured_peaks(rollout.tokens.device.type)
    B = rollout.tokens.shape[0]
    per_epoch = -(-B // cfg.mini_batch_size)
    return roofline.ppo_step_report(
        policy.cfg, rollout.attention_mask[:, :rollout.prompt_len].sum(1).tolist(),
        rollout.response_mask.sum(1).tolist(), {**rollout.seconds, "update": update_seconds},
        update_passes=minibatches_run / per_epoch, full=cfg.lora is None,
        peak=roofline.matmul_peak(peaks, cfg.dtype, cfg.load_in_8bit),
        peak_name=roofline.peak_kind(peaks, cfg.dtype, cfg.load_in_8bit),
        bandwidth=peaks.bandwidth, model_bytes=roofline.weight_bytes(policy),
        kv_element_bytes=policy.model.norm.weight.element_size())
