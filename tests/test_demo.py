"""The README's main command, end to end (about 2 minutes on 2 cores: run with -m slow)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
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
    assert last > first + 0.5, reward  # seed 0: -0.90 -> 0.63 (seed 1: 1.48 -> 2.28)
    # The adaptive controller holds the KL near its target of 6 over the last ten steps (seed 0: 6.8,
    # seed 1: 3.6; before tuning it ran to 14-19).
    tail_kl = sum(kl[s] for s in steps[-10:]) / 10
    assert 3.0 <= tail_kl <= 12.0, kl
