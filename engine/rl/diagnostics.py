"""PPO diagnostics the anchors lack: reward and length statistics split by how responses ended,
negative-KL tokens by token type, the share of repeated tokens, a sample table, and warnings for the
known failure modes (negative mean KL; reward rising while response diversity collapses, the blog's
"```" hack).

All statistics are over the global batch (ranks reduce their named sums); only rank 0 writes them.
"""
from __future__ import annotations

import torch

from rlhf_engine.engine.training import roofline
from rlhf_engine.engine.training.dist import Dist, all_gather_objects, all_reduce_named
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


# Step 6 reads each family of statistics in two halves: `*_sums` are this rank's named sums, reduced
# over ranks together in one collective by step_metrics; `*_metrics` turn the global sums into the logged
# figures. Extremes (min, max) and the reward distribution travel in one gather.

def reward_sums(raw: torch.Tensor, shaped: torch.Tensor, ended: torch.Tensor) -> dict:
    raw, shaped, e = raw.double(), shaped.double(), ended.double()
    return {"raw": raw.sum(), "raw_sq": (raw * raw).sum(), "n": raw.new_tensor(raw.numel()),
            "shaped": shaped.sum(), "raw_ended": (raw * e).sum(), "ended": e.sum(),
            "raw_truncated": (raw * (1 - e)).sum(), "truncated": (1 - e).sum()}


def reward_metrics(s: dict, scores: torch.Tensor) -> dict:
    """From the global reward_sums and every rank's raw scores."""
    n = max(s["n"], 1.0)
    mean = s["raw"] / n
    return {"env/reward_mean": mean, "env/reward_std": max(s["raw_sq"] / n - mean ** 2, 0.0) ** 0.5,
            "env/reward_min": scores.min().item(), "env/reward_max": scores.max().item(),
            "env/shaped_reward_mean": s["shaped"] / n,
            "env/reward_mean_ended": s["raw_ended"] / s["ended"] if s["ended"] > 0 else float("nan"),
            "env/reward_mean_truncated": s["raw_truncated"] / s["truncated"] if s["truncated"] > 0 else float("nan"),
            "env/reward_dist": scores}


def length_sums(lengths: torch.Tensor, ended: torch.Tensor) -> dict:
    return {"tokens": lengths.double().sum(), "rows": lengths.new_tensor(lengths.numel()).double(),
            "eos_rows": ended.double().sum()}


def length_metrics(s: dict, shortest: float, longest: float) -> dict:
    return {"env/response_length_mean": s["tokens"] / s["rows"], "env/response_length_min": shortest,
            "env/response_length_max": longest, "env/eos_fraction": s["eos_rows"] / s["rows"]}


def negative_kl_sums(log_ratio: torch.Tensor, response_mask: torch.Tensor, tokens: torch.Tensor, tok) -> dict:
    """How many response tokens have log π − log π_ref < 0 (k1 negative), by token type."""
    negative = (log_ratio < 0) & response_mask.bool()
    counts = {kind: 0.0 for kind in KINDS}
    for token in tokens[negative].tolist():
        counts[token_kind(tok.piece(token))] += 1
    return {**{f"negative_kl/{kind}": torch.tensor(n, dtype=torch.float64) for kind, n in counts.items()},
            "response_tokens": response_mask.sum().double()}


def negative_kl_metrics(s: dict) -> dict:
    total_negative = sum(s[f"negative_kl/{kind}"] for kind in KINDS)
    out = {"objective/negative_kl_tokens": total_negative,
           "objective/negative_kl_share": total_negative / max(s["response_tokens"], 1.0)}
    for kind in KINDS:
        out[f"objective/negative_kl_by_type/{kind.replace('/', '_')}"] = s[f"negative_kl/{kind}"] / max(total_negative, 1.0)
    return out


def first_minibatch_tolerance(device: torch.device, dtype: str, deterministic: bool) -> float:
    """How far the first minibatch's log ratio may be from 0: exactly 0 where the rollout's scoring and
    the update run the same deterministic kernels on the same rows (CPU, or --deterministic); on CUDA
    otherwise kernels may reduce in a different order from call to call, so a round-off band is allowed."""
    if device.type == "cpu" or deterministic:
        return 0.0
    return 1e-5 if dtype == "fp32" else 1e-3


def onpolicy_deltas(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """Δ = log π_trainer − log π_sampler on real response tokens [B, R], 0 elsewhere."""
    return (trainer_logprobs.double() - sampler_logprobs.double()) * response_mask


def onpolicy_sums(delta: torch.Tensor, response_mask: torch.Tensor, cliprange: float) -> dict:
    outside = ((delta.exp() < 1 - cliprange) | (delta.exp() > 1 + cliprange)) & response_mask.bool()
    return {"abs_delta": delta.abs().sum(), "seq_ratio": delta.sum(1).exp().sum(), "outside": outside.double().sum()}


def onpolicy_metrics(s: dict, largest: float) -> dict:
    """How far the policy the sampler drew from is from the policy the update scores: |Δ| mean and max, the
    mean over responses of exp(Σ Δ) (1 when they agree), and the share of tokens whose ratio exp(Δ) alone
    leaves PPO's clip band. Needs length_sums' rows and negative_kl_sums' response_tokens beside its own."""
    tokens = max(s["response_tokens"], 1.0)
    return {"onpolicy/logprob_diff_mean": s["abs_delta"] / tokens, "onpolicy/logprob_diff_max": largest,
            "onpolicy/seq_prob_ratio": s["seq_ratio"] / max(s["rows"], 1.0),
            "onpolicy/outside_clip_share": s["outside"] / tokens}


def onpolicy_warning(log, step: int, metrics: dict, history: list[dict], tolerance: float, every: int) -> None:
    """Warn when the sampler and the trainer disagree beyond round-off: at the first such step, then every
    `every` such steps (a persistent gap would otherwise flood the log)."""
    if metrics["onpolicy/logprob_diff_max"] <= tolerance:
        return
    earlier = sum(h.get("onpolicy/logprob_diff_max", 0.0) > tolerance for h in history)
    if earlier % every == 0:
        coarse = " in fp32 (a bar this coarse sees only gross gaps)" if tolerance >= 1.0 else ""  # bf16's bar
        log.warn(f"ppo: step {step}: the sampler's log-probs differ from the trainer's by up to "
                 f"{metrics['onpolicy/logprob_diff_max']:.2e} (tolerance {tolerance:g}): the samples may come from "
                 "another policy than the one being trained (stale adapter? different dtype?); see "
                 f"docs/ON_POLICY.md and run train.py check{coarse}")


def failure_warnings(log, step: int, metrics: dict, history: list[dict], window: int = 5, tolerance: float = 1e-2,
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


def kl_sums(rollout) -> dict:
    """Σ over responses of each response's KL, by every estimator (the one in use drives β), and Σ k1² for
    k1's spread over responses: is a negative mean more than noise?"""
    per_row = {name: masked_sum(kl_estimate(rollout.logprobs, rollout.ref_logprobs, name), rollout.response_mask, 1)
               for name in ("k1", "k2", "k3")}
    per_row["full"] = masked_sum(rollout.kl_full, rollout.response_mask, 1)
    k1 = per_row["k1"].double()
    return {**{f"kl_{name}": kl.double().sum() for name, kl in per_row.items()}, "kl_k1_sq": (k1 * k1).sum()}


def kl_metrics(s: dict) -> dict:
    """Mean KL per response by estimator, and k1's standard error (needs length_sums' rows)."""
    n = max(s["rows"], 1.0)
    mean = s["kl_k1"] / n
    var = max(s["kl_k1_sq"] / n - mean ** 2, 0.0)
    return {**{f"objective/kl_{name}": s[f"kl_{name}"] / n for name in ("k1", "k2", "k3", "full")},
            "objective/kl_k1_stderr": (var / n) ** 0.5}


def ensemble_sums(member_scores: torch.Tensor | None) -> dict:
    """Σ over rows of each member's score and of the members' spread (their standard deviation per row)."""
    if member_scores is None:
        return {}
    m = member_scores.double()
    return {**{f"member{i}": m[i].sum() for i in range(len(m))}, "member_spread": m.std(0, unbiased=False).sum()}


def ensemble_metrics(s: dict) -> dict:
    """Each member's mean score and the mean spread between members (needs length_sums' rows)."""
    n = max(s["rows"], 1.0)
    members = sorted(k for k in s if k.startswith("member") and k != "member_spread")
    if not members:
        return {}
    return {**{f"env/reward_{k}_mean": s[k] / n for k in members}, "env/reward_member_spread": s["member_spread"] / n}


def step_metrics(dist: Dist, rollout, scores: torch.Tensor, penalty, kl_estimator: str, cliprange: float, tok,
                 seconds: float) -> dict:
    """Step 6: the step's statistics over the global batch, from every rank's named sums reduced in one
    collective, and the extremes and raw scores gathered in one more. `scores` are the shaped scores,
    `penalty` the KL penalty (rlhf_math.KLPenalty), `seconds` the step's wall time so far."""
    mask = rollout.response_mask
    lengths = mask.sum(1).long()
    delta = onpolicy_deltas(rollout.sampler_logprobs, rollout.logprobs, mask)
    sums = {**reward_sums(rollout.raw_scores, scores, rollout.ended), **length_sums(lengths, rollout.ended),
            **negative_kl_sums(rollout.logprobs - rollout.ref_logprobs, mask, rollout.response_tokens, tok),
            **onpolicy_sums(delta, mask, cliprange), **kl_sums(rollout), **ensemble_sums(rollout.member_scores),
            "non_score_reward": penalty.non_score_reward.double().sum(),
            "attended_tokens": rollout.attention_mask.double().sum()}
    s = all_reduce_named(dist, sums)
    gathered = all_gather_objects(dist, (rollout.raw_scores.cpu(), lengths.min().item(), lengths.max().item(),
                                         delta.abs().max().item()))
    all_scores = torch.cat([torch.as_tensor(g[0]) for g in gathered])
    kl = kl_metrics(s)
    return {**kl, "objective/kl": kl[f"objective/kl_{kl_estimator}"],
            # −β·Σ_t KL_t per response: the penalty's share of the reward
            "objective/non_score_reward": s["non_score_reward"] / s["rows"],
            **reward_metrics(s, all_scores),
            **length_metrics(s, float(min(g[1] for g in gathered)), float(max(g[2] for g in gathered))),
            **negative_kl_metrics(s), **onpolicy_metrics(s, max(g[3] for g in gathered)), **ensemble_metrics(s),
            "env/repeated_token_share": repeated_token_share(rollout.response_tokens, mask),
            "perf/tokens_per_s": s["attended_tokens"] / seconds}


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
    report = roofline.ppo_step_report(
        policy.cfg, rollout.attention_mask[:, :rollout.prompt_len].sum(1).tolist(),
        rollout.response_mask.sum(1).tolist(), {**rollout.seconds, "update": update_seconds},
        update_passes=minibatches_run / per_epoch, full=cfg.lora is None,
        peak=roofline.matmul_peak(peaks, cfg.dtype, cfg.load_in_8bit),
        peak_name=roofline.peak_kind(peaks, cfg.dtype, cfg.load_in_8bit),
        bandwidth=peaks.bandwidth, model_bytes=roofline.weight_bytes(policy),
        kv_element_bytes=policy.model.norm.weight.element_size())
    # Padding in the rows as sampled (left-padded prompts, right-padded responses). The model runs every batch on
    # its real tokens alone (llama.Unpadded): none of it reaches a linear, and attention pads rows only where one
    # call over a few rows of near-equal length costs less than a call per row (varlen.plan_rows).
    padding = roofline.padding_share(rollout.attention_mask.sum(1).tolist(), rollout.tokens.shape[1])
    return roofline.StepReport({**report.metrics, "perf/padding_share_sampled": padding},
                               f"{report.line}, padding {padding:.0%} as sampled, none in the linears")
