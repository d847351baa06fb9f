"""Training checkpoints: --resume auto never takes a half-written checkpoint; rotation; RNG round trip."""
import os
import random

import numpy as np
import pytest
import torch

from rlhf_engine.engine.training.dist import init_dist
from rlhf_engine.engine.training.train_state import (TRAINER_STATE, list_checkpoints, load_trainer_state,
                                                     resolve_resume, rng_state, save_training_checkpoint)


def write(folder):
    with open(os.path.join(folder, "weights.bin"), "wb") as f:
        f.write(b"x" * 10)


def test_resume_auto_skips_a_save_killed_midway(tmp_path):
    dist = init_dist("cpu")
    save_training_checkpoint(dist, str(tmp_path), 10, write, {"a": 1})
    # What a SIGKILL during the save of step 20 leaves behind: the hidden temp folder, half full.
    half = tmp_path / ".checkpoint-000020.tmp-abc123"
    half.mkdir()
    (half / "weights.bin").write_bytes(b"x" * 3)
    # A folder with the final name but no trainer state (e.g. copied by hand) is not complete either.
    (tmp_path / "checkpoint-000030").mkdir()
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [10]
    assert resolve_resume(dist, "auto", str(tmp_path)) == str(tmp_path / "checkpoint-000010")
    with pytest.raises(FileNotFoundError, match="no trainer_state.pt there"):
        resolve_resume(dist, str(tmp_path / "checkpoint-000030"), str(tmp_path))
    assert resolve_resume(dist, "auto", str(tmp_path / "empty")) is None


def test_rotation_keeps_the_newest(tmp_path):
    dist = init_dist("cpu")
    for step in (1, 2, 3, 4):
        save_training_checkpoint(dist, str(tmp_path), step, write, {}, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4]


def test_rng_states_round_trip_through_the_trainer_state(tmp_path):
    dist = init_dist("cpu")
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    path = save_training_checkpoint(dist, str(tmp_path), 5, write, {"note": "x"})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = load_trainer_state(dist, path)
    assert state["step"] == 5 and state["note"] == "x"
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert os.path.exists(os.path.join(path, TRAINER_STATE))
    assert set(rng_state()) >= {"python", "numpy", "torch"}
