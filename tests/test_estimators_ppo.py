"""Critic-free estimators on PPO's loop: each learns a scripted reward, builds no value function, keeps
the first-minibatch ratio exact, resumes exactly, and gives one rank's update on two ranks."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_metrics
from ppo_run import config, reward_multiple_of_4

from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.ppo import train

CRITIC_FREE = ["rloo", "grpo", "dr_grpo", "reinforce_pp", "remax"]


def run(ppo_base, out, estimator, **kw):
    settings = dict(batch_size=8, mini_batch_size=8, ppo_epochs=2, max_steps=2, estimator=estimator,
                    samples_per_prompt=4, kl_coef=0.01)
    return train(config(*ppo_base, str(out), **{**settings, **kw}), init_dist("cpu"),
                 reward_fn=reward_multiple_of_4)["history"]


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_each_estimator_raises_a_scripted_reward(estimator, ppo_base, tmp_path, capsys):
    history = run(ppo_base, tmp_path, estimator, max_steps=20, lr=1e-2)
    rewards = [h["env/reward_mean"] for h in history]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards  # chance is 0.25
    assert all(h["onpolicy/first_minibatch_drift"] == 0.0 for h in history)  # ratio exactly 1, every step
    assert all(h["ppo/value_loss"] == 0.0 for h in history)
    assert "value = none (critic-free)" in capsys.readouterr().out


def test_critic_free_runs_build_no_value_parameters(ppo_base, tmp_path, monkeypatch):
    import rlhf_engine.engine.ppo as ppo
    built = {}
    real = ppo.PolicyAndValue

    def spy(*args, **kwargs):
        built["pv"] = real(*args, **kwargs)
        return built["pv"]
    monkeypatch.setattr(ppo, "PolicyAndValue", spy)
    run(ppo_base, tmp_path / "grpo", "grpo", max_steps=1)
    assert built["pv"].value_head is None
    assert not [n for n, p in built["pv"].named_parameters() if p.requires_grad and "lora" not in n]
    run(ppo_base, tmp_path / "ppo", "ppo", max_steps=1, samples_per_prompt=1)
    assert built["pv"].value_head is not None


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_resume_equals_uninterrupted(estimator, ppo_base, tmp_path):
    kw = dict(max_steps=4, save_every=2, keep=10)
    run(ppo_base, tmp_path / "full", estimator, **kw)
    run(ppo_base, tmp_path / "part", estimator, **{**kw, "max_steps": 2})
    (tmp_path / "part" / "metrics.jsonl").unlink()
    torch.manual_seed(99)
    run(ppo_base, tmp_path / "part", estimator, **kw, resume=str(tmp_path / "part" / "checkpoint-000002"))
    for key in ("env/reward_mean", "ppo/policy_loss", "ppo/kl_loss", "objective/kl"):
        full, resumed = read_metrics(tmp_path / "full", key), read_metrics(tmp_path / "part", key)
        assert sorted(resumed) == [2, 3] and all(resumed[s] == full[s] for s in resumed), key


def test_groups_stay_together_and_two_ranks_equal_one(ppo_base, tmp_path):
    from safetensors.torch import load_file
    script = os.path.join(ROOT, "tests", "ppo_run.py")
    # 4 queries x 2 samples in all, one epoch of one minibatch: on one rank 8 rows, on two ranks 4 rows each.
    # (One optimizer step: Adam's first step is lr·sign(gradient), so a later step would amplify the
    # summation-order round-off of near-zero gradient entries into differences of size lr.)
    for name, n, batch, mini in (("one", 1, "4", "8"), ("two", 2, "2", "4")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29800 + os.getpid() % 500 + n), script, *ppo_base, str(tmp_path / name), batch, mini, "1", "1",
               "estimator=rloo", "samples_per_prompt=2"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
    a = load_file(tmp_path / "one" / "checkpoint-000001" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint-000001" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # the update did something
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-4 * max(1.0, a[k].abs().max().item()), k


@pytest.mark.parametrize("kw, match", [
    (dict(estimator="rloo", samples_per_prompt=1), "needs --samples-per-prompt >= 2"),
    (dict(estimator="grpo", samples_per_prompt=1), "needs --samples-per-prompt >= 2"),
    (dict(estimator="rloo", samples_per_prompt=2, value_model="reward"), "trains no value function"),
    (dict(batch_size=3, samples_per_prompt=3, mini_batch_size=4), "must be a multiple of --mini-batch-size"),
])
def test_bad_combinations_are_refused(kw, match, ppo_base, tmp_path):
    with pytest.raises(ValueError, match=match):
        config(*ppo_base, str(tmp_path), **kw)


def test_remax_baseline_is_the_greedy_responses_total_reward(ppo_base):
    """ReMax's baseline is scored like a sampled response: its RM score and the KL penalty of its own tokens
    (Σ_t log π − log π_ref under the sampling temperature), not the score alone, which sat above every
    sampled total by about β·KL and made nearly every advantage negative."""
    from rlhf_engine.engine.weights.builder import resolve_tokenizer
    from rlhf_engine.engine.weights.load import load_checkpoint
    from rlhf_engine.engine.model.generate import SamplingConfig, generate
    from rlhf_engine.engine.model.lora import LoRAConfig, apply_lora
    from rlhf_engine.engine.rl.rollout import PolicyAndValue, greedy_baseline
    tok = resolve_tokenizer(ppo_base[0], None)
    policy = apply_lora(load_checkpoint(ppo_base[0]), LoRAConfig(r=4, targets=("all-linear",), dropout=0.0))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n.endswith("lora_b"):  # the policy moved away from its reference
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    pv, base = PolicyAndValue(policy, critic=False).eval(), load_checkpoint(ppo_base[0]).eval()
    prompts, sampling = [[1, 40, 41, 42], [1, 50, 51]], SamplingConfig(max_new_tokens=6, temperature=0.7)
    length_reward = lambda tokens, mask: mask.sum(1).float()  # noqa: E731
    g = greedy_baseline(pv, None, length_reward, prompts, sampling, tok, "fp32", "k1")
    greedy = generate(policy, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0), tok.eos_id, tok.pad_id)
    tokens, mask, _ = greedy.rows()
    P = greedy.prompt_tokens.shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(policy(tokens, attention_mask=mask)[:, P - 1:-1] / 0.7, -1)
        ref_logp = torch.log_softmax(base(tokens, attention_mask=mask)[:, P - 1:-1] / 0.7, -1)
    pick = lambda lp: lp.gather(-1, greedy.response_tokens[..., None]).squeeze(-1)  # noqa: E731
    want_kl = ((pick(logp) - pick(ref_logp)) * greedy.response_mask).sum(1)
    assert torch.allclose(g.kl, want_kl, atol=1e-4) and want_kl.abs().min() > 1e-2
    assert g.raw_scores.tolist() == mask.sum(1).float().tolist() and torch.equal(g.ended, greedy.ended)
