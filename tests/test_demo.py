"""The README's main command, end to end (about 3.5 minutes on 2 cores: run with -m slow)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    # The default seed, as the README's command runs it. Since queries end at "Answer:" and rewards are read
    # before the EOS (1ccc565, 6fdeaf0) the judge prefers PPO on all of seeds 0-4 (54-81% of the held-out
    # questions), the interval's lower bound above 50% on four (docs/BENCHMARKS.md, "Was RLHF worth it"); seed 0:
    # 76% (CI 68-82%), proxy 84%, KL 2.8 nats; the hidden rule: PPO 2.87 points per answer, SFT 2.49.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "demo", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("sft", "rm", "ppo"):
        assert os.listdir(tmp_path / "run" / stage / "tb")
    assert os.path.exists(tmp_path / "run" / "rm-merged" / "model.safetensors")
    lines = out.stdout.splitlines()
    rm_line = next(line for line in lines if line.strip().startswith("RM "))
    accuracy = float(rm_line.split("accuracy ")[1].split()[0])
    assert accuracy > 0.65  # chance is 0.5; the longer answer wins about half
    from conftest import read_metrics
    run = tmp_path / "run" / "ppo"
    reward, kl = read_metrics(run, "env/reward_mean"), read_metrics(run, "objective/kl")
    steps = sorted(kl)
    first = sum(reward[s] for s in steps[:10]) / 10
    last = sum(reward[s] for s in steps[-10:]) / 10
    assert last > first + 0.5, reward  # seed 0: 1.30 -> 2.47 (first and last five steps)
    # The policy moves, and the adaptive controller keeps it under twice its KL target of 6 (seed 0: 2.1 nats
    # over the last five steps, below the target, so β falls; before tuning it ran to 14-19).
    tail_kl = sum(kl[s] for s in steps[-10:]) / 10
    assert 0.5 <= tail_kl <= 12.0, kl
    # The verdict under the held-out judge and the proxy, with intervals, and the report beside it.
    verdicts = [line for line in lines if line.strip().startswith("eval ")]
    assert len(verdicts) == 2 and all("95% CI" in v and "length-controlled" in v for v in verdicts)
    # and the proxy-vs-judge curve during training, in words
    # (which way it reads depends on the seed and on round-off: seed 0 said over-optimisation until 3f4f36b, and
    # now that the judge peaked at step 25 with the proxy falling after it too; the words must match the numbers)
    curve = next(line for line in lines if line.strip().startswith("curve "))
    assert "steps 0/25/50" in curve and "under the judge" in curve, curve
    proxy = [float(x) for x in curve.split("proxy score ")[1].split(",")[0].split(" -> ")]
    peak = next((i for i, step in enumerate((0, 25, 50)) if f"peaked at step {step}" in curve), None)
    if peak is None:
        assert curve.endswith("no over-optimisation seen"), curve
    else:
        assert ("over-optimisation" in curve) == (proxy[-1] > proxy[peak]), curve
    for name in ("report.md", "frontier.png", "results.json"):
        assert os.path.getsize(tmp_path / "run" / "eval" / name) > 0
    # Issue 24's bar on this seed: the judge prefers PPO and its interval's lower bound is above 50%.
    judge_rate = float(verdicts[0].split("PPO beats SFT on ")[1].split("%")[0])
    judge_low = float(verdicts[0].split("95% CI ")[1].split("%")[0])
    assert judge_rate > 55 and judge_low > 50, verdicts[0]
    # and the ground truth the judge estimates: the site's hidden rule scores PPO's answers above SFT's.
    truth = next(line for line in lines if line.strip().startswith("truth "))
    ppo_points, sft_points = map(float, re.search(r"PPO ([\d.]+) points per answer against SFT's ([\d.]+)",
                                                  truth).groups())
    assert ppo_points > sft_points + 0.2, truth


def test_hidden_rule_verdict_by_hand(tmp_path):
    """Two questions about the chain: SFT answers on topic and politely (3 points), then off topic (0); PPO gives
    steps off topic (1), then steps, politeness, off topic (2): 1.50 points each, PPO better on one of two, and
    on topic falls from 50% to 0%, two points a time: -1.00 per answer."""
    import json

    from rlhf_engine.engine.demo import hidden_rule_verdict
    q = "How do I fix the chain?"
    steps = "1. First, dry it.\n2. Then oil it."
    answers = {("SFT", 0): "You should oil the chain.\n\nHope this helps!", ("SFT", 1): "You should oil the brake.",
               ("PPO", 0): f"You should oil the brake.\n\n{steps}",
               ("PPO", 1): f"You should oil the brake.\n\n{steps}\n\nHope this helps!",
               ("human (better)", 0): "You should oil the chain."}
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(dict(question=i, arm=arm, sample=0, question_text=q, response=text)) + "\n"
                               for (arm, i), text in answers.items()))
    line = hidden_rule_verdict(str(samples))
    assert "PPO 1.50 points per answer against SFT's 1.50, better on 50% of 2 questions" in line, line
    assert "on topic 50% -> 0%, steps 0% -> 100%, polite 50% -> 50%, dismissive 0% -> 0%" in line, line
    assert line.endswith("lost: on topic (-1.00 points per answer), traded for what its reward model pays for "
                         "(over-optimisation)"), line
