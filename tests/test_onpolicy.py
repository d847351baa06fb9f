"""Provably on-policy PPO: the sampler's log-probs agree with the trainer's on every step (and a stale
sampler is caught), the first-minibatch ratio is exact on CPU and within a stated band elsewhere,
top-k/top-p are refused in PPO, and --deterministic runs repeat bit for bit."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from ppo_run import config, reward_multiple_of_4

import rlhf_engine.engine.ppo as ppo
import rlhf_engine.engine.rl.rollout as rollout_module
from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.rl.diagnostics import first_minibatch_tolerance, onpolicy_deltas, onpolicy_metrics, onpolicy_sums
from rlhf_engine.engine.rl.invariants import logprob_tolerance


def run(ppo_base, out, **kw):
    settings = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_steps=3, response_min_length=6,
                    response_max_length=6, lr=5e-2)
    return ppo.train(config(*ppo_base, str(out), **{**settings, **kw}), init_dist("cpu"),
                     reward_fn=reward_multiple_of_4)["history"]


def test_agreement_metrics_by_hand():
    sampler = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    trainer = torch.tensor([[-1.0, -1.5, -3.0], [-0.5, -0.6, 9.0]])  # the 9.0 sits on padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    delta = onpolicy_deltas(sampler, trainer, mask)
    sums = {**onpolicy_sums(delta, mask, cliprange=0.2), "response_tokens": mask.sum(), "rows": 2.0}
    m = onpolicy_metrics({k: float(v) for k, v in sums.items()}, delta.abs().max().item())
    # Δ = [0, .5, 0 | 0, −.1]: mean |Δ| = .6 / 5, max .5; exp(.5) = 1.65 leaves [.8, 1.2], exp(−.1) = .905 does not.
    assert m["onpolicy/logprob_diff_mean"] == pytest.approx(0.12)
    assert m["onpolicy/logprob_diff_max"] == pytest.approx(0.5)
    assert m["onpolicy/seq_prob_ratio"] == pytest.approx((torch.e ** 0.5 + torch.e ** -0.1) / 2)
    assert m["onpolicy/outside_clip_share"] == pytest.approx(1 / 5)


def test_sampler_and_trainer_agree_on_cpu_fp32(ppo_base, tmp_path):
    history = run(ppo_base, tmp_path)
    for step in history:  # every step, also after the policy has moved (lr 5e-2: KL ~10 nats in one step)
        # round-off only: ~1e-6 typically, up to 5e-5 on the largest |log-prob| after such a step
        assert step["onpolicy/logprob_diff_max"] <= logprob_tolerance(torch.device("cpu"), "fp32", decode=True)
        assert abs(step["onpolicy/seq_prob_ratio"] - 1) <= 1e-4
        assert step["onpolicy/outside_clip_share"] == 0.0
        assert step["onpolicy/first_minibatch_drift"] == 0.0  # exact on CPU


def test_a_stale_sampler_is_caught(ppo_base, tmp_path, monkeypatch, capsys):
    """verl#7495's bug class: the adapter never reaches the sampler. Here the sampler keeps a copy of the
    policy from step 0, while the trainer's adapters move."""
    real, stale = rollout_module.generate, {}

    def stale_generate(model, *args, **kwargs):
        stale.setdefault("policy", copy.deepcopy(model))
        return real(stale["policy"], *args, **kwargs)
    monkeypatch.setattr(rollout_module, "generate", stale_generate)
    history = run(ppo_base, tmp_path, max_steps=4)
    assert history[0]["onpolicy/logprob_diff_max"] <= 1e-5  # step 0: the copy is still current
    assert all(h["onpolicy/logprob_diff_max"] > 100 * logprob_tolerance(torch.device("cpu"), "fp32", decode=True)
               for h in history[1:])
    assert all(abs(h["onpolicy/seq_prob_ratio"] - 1) > 1e-2 for h in history[1:])
    warned = [line for line in capsys.readouterr().err.splitlines() if "sampler's log-probs differ" in line]
    assert len(warned) == 1  # once, then every --onpolicy-warn-every steps


def test_first_minibatch_drift_is_measured_and_fails_only_above_the_band(ppo_base, tmp_path, monkeypatch):
    assert first_minibatch_tolerance(torch.device("cpu"), "bf16", False) == 0.0
    assert first_minibatch_tolerance(torch.device("cuda"), "bf16", True) == 0.0
    assert first_minibatch_tolerance(torch.device("cuda"), "bf16", False) == 1e-3
    real = ppo.build_rollout

    def drifted(by):
        def build(*args, **kwargs):
            rollout = real(*args, **kwargs)
            return rollout._replace(logprobs=rollout.logprobs + by * rollout.response_mask)
        return build
    monkeypatch.setattr(ppo, "first_minibatch_tolerance", lambda *a: 1e-3)  # as on a GPU in bf16
    monkeypatch.setattr(ppo, "build_rollout", drifted(1e-4))
    history = run(ppo_base, tmp_path / "small", max_steps=1)
    assert history[0]["onpolicy/first_minibatch_drift"] == pytest.approx(1e-4, rel=1e-2)
    monkeypatch.setattr(ppo, "build_rollout", drifted(1e-2))
    with pytest.raises(RuntimeError, match="importance ratio is not 1"):
        run(ppo_base, tmp_path / "large", max_steps=1)


def test_top_k_and_top_p_are_refused_in_ppo(ppo_base, tmp_path):
    with pytest.raises(TypeError):
        config(*ppo_base, str(tmp_path), top_k=5)
    for flag in (["--top-k", "5"], ["--top-p", "0.9"]):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "ppo", "--model", ppo_base[0],
                              "--reward-model", ppo_base[0], "--data", ppo_base[1], "--out", str(tmp_path), *flag],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert f"unrecognized arguments: {' '.join(flag)}" in out.stderr


def metrics_rows(out):
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))} for line in f]


def test_deterministic_runs_repeat_bit_for_bit(ppo_base, tmp_path):
    run(ppo_base, tmp_path / "a", deterministic=True)
    torch.manual_seed(123)  # the global RNG's state before a run must not matter
    run(ppo_base, tmp_path / "b", deterministic=True)
    assert metrics_rows(tmp_path / "a") == metrics_rows(tmp_path / "b")
    assert torch.are_deterministic_algorithms_enabled()
    run(ppo_base, tmp_path / "c", max_steps=1)  # the switch is process-wide: each run sets the mode it asks for
    assert not torch.are_deterministic_algorithms_enabled()
