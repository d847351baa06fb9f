"""The README's main command, end to end (about 5 minutes on 2 cores: run with -m slow)."""
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
    ppo_line = next(line for line in lines if line.strip().startswith("PPO "))
    start, end = (float(x) for x in ppo_line.split("reward ")[1].split(" over the first")[0:1]
                  + [ppo_line.split("-> ")[1].split()[0]])
    assert end > start
