"""PPO's switches, each run end to end on the tiny base with the scripted reward: it runs, logs its
statistic, and moves the update the way it should.

Step 0's rollout is the same whatever the switch (same seeds, and fresh adapters make the policy equal to
its reference), so switches that act on the update are compared on step 0's figures.
"""
import pytest
import torch
from ppo_run import config, reward_multiple_of_4

from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.ppo import train


def run(ppo_base, out, **kw):
    settings = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_steps=2, lr=5e-2, adaptive_kl=False)
    return train(config(*ppo_base, str(out), **{**settings, **kw}), init_dist("cpu"),
                 reward_fn=reward_multiple_of_4)["history"]


@pytest.fixture(scope="module")
def no_penalty(ppo_base, tmp_path_factory):
    return run(ppo_base, tmp_path_factory.mktemp("no_penalty"), kl_coef=0.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "full"])
def test_kl_estimator_drives_the_penalty_and_the_controller(estimator, ppo_base, tmp_path):
    history = run(ppo_base, tmp_path, kl_coef=0.5, kl_estimator=estimator, max_steps=3)
    assert abs(history[0]["objective/kl"]) < 1e-5  # fresh adapters: the policy is its reference
    for step in history[1:]:
        assert step["objective/kl"] == step[f"objective/kl_{estimator}"] != 0.0  # the estimator in use is logged
        # The reward carries −β·KL_t on every token: per response, −β times the KL the controller sees.
        assert step["objective/non_score_reward"] == pytest.approx(-0.5 * step["objective/kl"], rel=1e-4)
        if estimator != "k1":  # k2, k3 and the exact KL are never negative: the penalty only lowers the reward
            assert step["objective/non_score_reward"] < 0.0


def test_whitening_per_minibatch_leaves_the_batch_advantages_raw(ppo_base, no_penalty, tmp_path):
    history = run(ppo_base, tmp_path, kl_coef=0.0, whiten="minibatch")
    assert abs(no_penalty[0]["ppo/advantages_mean"]) < 1e-5  # batch whitening: mean 0 over the whole batch
    assert abs(history[0]["ppo/advantages_mean"]) > 1e-3  # per minibatch: the batch mean is the raw one
    assert history[0]["ppo/returns_mean"] == no_penalty[0]["ppo/returns_mean"]  # same rollout, other update
    assert history[0]["ppo/policy_loss"] != no_penalty[0]["ppo/policy_loss"]


def test_reward_normalisation_centres_the_shaped_scores(ppo_base, no_penalty, tmp_path):
    history = run(ppo_base, tmp_path, kl_coef=0.0, reward_norm=True)
    assert no_penalty[0]["env/shaped_reward_mean"] == pytest.approx(no_penalty[0]["env/reward_mean"])
    # After step 0 the running moments are this batch's: its shaped scores have mean 0 and std 1.
    assert abs(history[0]["env/shaped_reward_mean"]) < 1e-5
    assert history[0]["env/reward_mean"] == no_penalty[0]["env/reward_mean"]


def test_no_eos_penalty_replaces_the_score_of_truncated_responses(ppo_base, tmp_path):
    history = run(ppo_base, tmp_path, kl_coef=0.0, no_eos_penalty=-3.0, max_steps=1)
    step = history[0]
    ended = step["env/eos_fraction"]
    assert ended < 1.0  # two-token responses are mostly cut at the cap
    reward_ended = step["env/reward_mean_ended"] if ended > 0 else 0.0
    assert step["env/shaped_reward_mean"] == pytest.approx(ended * reward_ended + (1 - ended) * -3.0)


def optimizer_steps(out):
    state = torch.load(sorted(out.glob("checkpoint-*"))[-1] / "trainer_state.pt", weights_only=True)
    return max(int(s["step"]) for s in state["optimizer"]["state"].values())


def test_approx_kl_early_stop_ends_the_epochs(ppo_base, tmp_path):
    # lr 5e-2 moves the tiny policy far in one step: the ratio guard (default 10) is lifted so that only the
    # early stop decides how many minibatches step.
    run(ppo_base, tmp_path / "all", kl_coef=0.0, max_steps=1, ratio_threshold=1e9)
    history = run(ppo_base, tmp_path / "stop", kl_coef=0.0, max_steps=1, early_stop_kl=1e-9, ratio_threshold=1e9)
    assert history[0]["ppo/early_stopped"] == 1.0
    # 2 epochs x 2 minibatches = 4 steps; the first minibatch's ratio is exactly 1 (approx KL 0), the
    # second sees the first's update, exceeds the threshold, and stops the epochs after its own step.
    assert optimizer_steps(tmp_path / "all") == 4 and optimizer_steps(tmp_path / "stop") == 2


def test_ratio_threshold_skips_every_minibatch_and_leaves_the_weights(ppo_base, tmp_path):
    from safetensors.torch import load_file
    history = run(ppo_base, tmp_path, kl_coef=0.0, max_steps=1, ratio_threshold=0.5)
    assert history[0]["ppo/skipped_minibatches"] == 4 and history[0]["ppo/ratio_mean"] > 0.5
    weights = load_file(tmp_path / "checkpoint-000001" / "adapter_model.safetensors")
    assert all(v.abs().max().item() == 0.0 for k, v in weights.items() if "lora_B" in k)  # no step was taken
