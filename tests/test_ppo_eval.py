"""Evaluation during PPO: fixed held-out questions, the policy against its reference, under a held-out
judge; it logs every N steps and at the end, and never changes the training run it watches."""
import json
import os

import pytest
from ppo_run import config, reward_multiple_of_4

from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.ppo import train


@pytest.fixture(scope="module")
def judge(random_rm):
    return random_rm  # a judge the policy never trained against


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_eval_during_ppo_logs_and_leaves_training_unchanged(ppo_base, synthetic_pairs, judge, tmp_path):
    settings = dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_steps=4, response_min_length=4,
                    response_max_length=4, lr=5e-2)
    evaluation = os.path.join(synthetic_pairs[0], "evaluation")
    train(config(*ppo_base, str(tmp_path / "plain"), **settings), init_dist("cpu"), reward_fn=reward_multiple_of_4)
    train(config(*ppo_base, str(tmp_path / "eval"), eval_every=2, eval_data=evaluation, eval_prompts=12, judge=judge,
                 **settings), init_dist("cpu"), reward_fn=reward_multiple_of_4)
    evals = {r["step"]: r for r in rows(tmp_path / "eval") if "eval/win_rate_vs_reference" in r}
    assert sorted(evals) == [0, 2, 4]  # every 2 steps and at the end
    # Step 0: fresh adapters, so the policy is its reference: same answers, all ties, KL exactly 0.
    assert evals[0]["eval/win_rate_vs_reference"] == 0.5 and evals[0]["eval/kl_to_reference"] == 0.0
    assert evals[4]["eval/kl_to_reference"] > 0.0 and evals[4]["eval/length_mean"] > 0
    assert all(0.0 <= e["eval/proxy_score"] <= 1.0 for e in evals.values())  # the scripted proxy's range
    assert "eval/judge_score" in evals[4]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "eval/"))}  # noqa: E731
                        for r in rs if "eval/win_rate_vs_reference" not in r]
    assert strip(rows(tmp_path / "plain")) == strip(rows(tmp_path / "eval"))  # evaluation does not disturb training


def test_eval_every_needs_eval_data(ppo_base, tmp_path):
    with pytest.raises(ValueError, match="--eval-every needs --eval-data"):
        config(*ppo_base, str(tmp_path), eval_every=2)


def test_a_judge_that_is_not_a_reward_model_is_refused(ppo_base, synthetic_pairs, tmp_path):
    with pytest.raises(ValueError, match="is not a reward model"):
        train(config(*ppo_base, str(tmp_path), eval_every=1, judge=ppo_base[0],
                     eval_data=os.path.join(synthetic_pairs[0], "evaluation")), init_dist("cpu"),
              reward_fn=reward_multiple_of_4)


def test_the_judges_best_checkpoint_is_named_kept_through_rotation_and_loadable(ppo_base, synthetic_pairs, judge,
                                                                                tmp_path, monkeypatch, capsys):
    """Scripted judge scores 0.1, 0.5, 0.9, 0.3, 0.2 at steps 0-4: step 2 is the best. With --keep 1 rotation
    would delete it; it stays, OUT/best links to it, best.json says why, and it loads as a policy."""
    from rlhf_engine.engine.eval.ppo_eval import PPOEval
    from rlhf_engine.engine.weights.builder import load_model, resolve_tokenizer
    scores, proxy = iter([0.1, 0.5, 0.9, 0.3, 0.2]), iter([1.0, 2.0, 3.0, 4.0, 5.0])
    monkeypatch.setattr(PPOEval, "__call__", lambda self: {
        "eval/judge_score": next(scores), "eval/proxy_score": next(proxy), "eval/win_rate_vs_reference": 0.6,
        "eval/kl_to_reference": 1.5})
    out = tmp_path / "run"
    train(config(*ppo_base, str(out), batch_size=4, mini_batch_size=4, ppo_epochs=1, max_steps=4, response_min_length=4,
                 response_max_length=4, eval_every=1, eval_data=os.path.join(synthetic_pairs[0], "evaluation"),
                 eval_prompts=2, judge=judge, save_every=1, keep=1), init_dist("cpu"), reward_fn=reward_multiple_of_4)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    assert os.readlink(out / "best") == "checkpoint-000002"
    with open(out / "best.json") as f:
        assert json.load(f) == {"step": 2, "judge_score": 0.9, "win_rate": 0.6, "kl": 1.5}
    said = capsys.readouterr()
    assert "best checkpoint by the judge: step 2 (judge score 0.900" in said.out + said.err
    assert "the judge's score fell after it" in said.out + said.err
    assert "the proxy kept rising after the judge peaked at step 2: over-optimisation" in said.out + said.err
    policy = load_model(str(out / "best"), resolve_tokenizer(ppo_base[0], None))  # what train.py eval --models PPO=OUT/best loads
    assert any("lora" in name for name, _ in policy.named_parameters())


def test_curve_summary_names_over_optimisation_only_when_the_proxy_outlives_the_judge():
    from rlhf_engine.engine.eval.ppo_eval import curve_summary
    row = lambda proxy, judge, win: {"eval/proxy_score": proxy, "eval/judge_score": judge,  # noqa: E731
                                     "eval/win_rate_vs_reference": win}
    hacked = {0: row(1.0, -2.0, 0.5), 25: row(2.0, -1.0, 0.7), 50: row(3.0, -1.5, 0.6)}
    text = curve_summary(hacked, 32)
    assert "steps 0/25/50" in text and "proxy score 1.00 -> 2.00 -> 3.00" in text and "50% -> 70% -> 60%" in text
    assert "the proxy kept rising after the judge peaked at step 25: over-optimisation" in text
    rising = {0: row(1.0, -2.0, 0.5), 25: row(2.0, -1.0, 0.7), 50: row(3.0, -0.5, 0.8)}
    assert curve_summary(rising, 32).endswith("the judge scored the last evaluation highest: no over-optimisation seen")
    both_fell = {0: row(1.0, -2.0, 0.5), 25: row(2.0, -1.0, 0.7), 50: row(1.5, -1.5, 0.6)}
    assert curve_summary(both_fell, 32).endswith("the judge peaked at step 25, and the proxy fell after it too")
    no_judge = {s: {k: v for k, v in r.items() if k != "eval/judge_score"} for s, r in hacked.items()}
    assert "under the proxy" in curve_summary(no_judge, 32) and "cannot show" in curve_summary(no_judge, 32)
