"""Evaluation during PPO (`--eval-every N`): every N steps, and at the end, the policy answers a fixed set
of held-out questions with fixed seeds, and so does the reference (the same network with its adapters
off). Logged: eval/proxy_score (the RM being optimised), eval/judge_score (a held-out RM, --judge),
eval/win_rate_vs_reference (under the judge, or the proxy without one; ties count ½),
eval/kl_to_reference (exact, summed over each response) and eval/length_mean. A proxy that keeps
rising while the judge turns down is reward over-optimisation (Gao et al. 2022), visible in TensorBoard.

Questions are split over ranks (rank r takes every W-th); the sums are reduced, so the figures do not
depend on the world size. The reference's answers never change, so they are sampled and scored once.
"""
from __future__ import annotations

import contextlib
import time

import torch

from rlhf_engine.data.tokenizer import format_prompt
from rlhf_engine.engine.training.dist import Dist, all_reduce_named
from rlhf_engine.engine.training.train_state import row_seed
from rlhf_engine.engine.eval.answers import sample_answers, score_responses, sequence_kl
from rlhf_engine.engine.eval.questions import load_questions
from rlhf_engine.engine.model.generate import SamplingConfig
from rlhf_engine.engine.model.lora import disable_lora
from rlhf_engine.engine.rl.reward import RewardFn, load_reward_model


class PPOEval:
    def __init__(self, cfg, dist: Dist, tok, policy, reference, proxy: RewardFn):
        fits = min(cfg.max_prompt_length, policy.cfg.max_seq_len - cfg.response_max_length)  # as the rl prompts
        questions = load_questions(cfg.eval_data, cfg.eval_prompts, tok, fits)[dist.rank::dist.world_size]
        self.prompts = [tok.encode(format_prompt(q.text), bos=True) for q in questions]
        # Fixed seeds, one per question (by its index in the evaluation set), at the training temperature.
        self.seeds = [row_seed(cfg.seed, q.index, 7) for q in questions]
        self.sampling = SamplingConfig(max_new_tokens=cfg.response_max_length, temperature=cfg.temperature)
        self.cfg, self.dist, self.tok, self.policy, self.proxy = cfg, dist, tok, policy, proxy
        self.judge = load_reward_model(cfg.judge, tok, cfg.dtype, dist.device, cfg.load_in_8bit) if cfg.judge else None
        self.reference = reference  # None: the policy's own base with adapters disabled
        self.reference_answers, self.reference_scores = None, None

    def reference_context(self):
        return disable_lora(self.policy) if self.reference is None else contextlib.nullcontext()

    def reference_logits(self, tokens, attention_mask):
        with self.reference_context():
            return (self.reference or self.policy)(tokens, attention_mask=attention_mask)

    def answers(self, model) -> list[list[int]]:
        return sample_answers(model, self.prompts, self.seeds, self.sampling, self.tok.eos_id, self.tok.pad_id, 16)

    def score(self, reward_fn: RewardFn, answers) -> list[float]:
        return score_responses(reward_fn, self.prompts, answers, self.tok.pad_id, self.dist.device, self.cfg.dtype, 16)

    @torch.no_grad()
    def __call__(self) -> dict:
        t0 = time.time()
        judge = self.judge or self.proxy
        if self.reference_answers is None:
            with self.reference_context():
                self.reference_answers = self.answers(self.reference or self.policy)
            self.reference_scores = self.score(judge, self.reference_answers)
        answers = self.answers(self.policy)
        proxy, judged = self.score(self.proxy, answers), self.score(judge, answers)
        kl = []
        for start in range(0, len(answers), 16):
            kl += sequence_kl(self.policy, self.reference_logits, self.prompts[start:start + 16],
                              answers[start:start + 16], self.tok.pad_id, self.cfg.dtype)
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(judged, self.reference_scores))
        device, f64 = self.dist.device, torch.float64
        s = all_reduce_named(self.dist, {name: torch.tensor(float(v), dtype=f64, device=device) for name, v in dict(
            n=len(answers), proxy=sum(proxy), judge=sum(judged), wins=wins, kl=sum(kl),
            length=sum(map(len, answers))).items()})
        n = max(s["n"], 1.0)
        out = {"eval/proxy_score": s["proxy"] / n, "eval/win_rate_vs_reference": s["wins"] / n,
               "eval/kl_to_reference": s["kl"] / n, "eval/length_mean": s["length"] / n,
               "eval/seconds": time.time() - t0}
        if self.judge is not None:
            out["eval/judge_score"] = s["judge"] / n
        return out

    def run_and_log(self, log, step: int) -> dict:
        metrics = self()
        log.scalars(step, metrics)
        log.info(f"ppo: eval at step {step}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()))
        return metrics


def curve_summary(evals: dict[int, dict], questions: int) -> str:
    """The proxy-vs-judge curve of evaluation during PPO, {step: run_and_log's metrics}, in one sentence.
    Over-optimisation is the proxy still rising after the judge's score peaked (Gao et al. 2022)."""
    steps = sorted(evals)
    judged = "eval/judge_score" in evals[steps[0]]
    curve = lambda key, fmt: " -> ".join(format(evals[s][key], fmt) for s in steps)  # noqa: E731
    head = (f"proxy vs judge during training ({questions} held-out questions, steps "
            f"{'/'.join(map(str, steps))}): proxy score {curve('eval/proxy_score', '.2f')}, win rate against the "
            f"reference under the {'judge' if judged else 'proxy'} {curve('eval/win_rate_vs_reference', '.0%')}")
    if not judged:
        return head + "; no --judge, so over-optimisation cannot show"
    peak, last = max(steps, key=lambda s: evals[s]["eval/judge_score"]), steps[-1]
    if peak == last:
        return head + "; the judge scored the last evaluation highest: no over-optimisation seen"
    if evals[last]["eval/proxy_score"] > evals[peak]["eval/proxy_score"]:
        return (head + f"; the proxy kept rising after the judge peaked at step {peak}: over-optimisation (or noise "
                f"on {questions} questions: train.py eval's intervals tell which)")
    return head + f"; the judge peaked at step {peak}, and the proxy fell after it too"

