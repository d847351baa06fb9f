"""The RLHF part: the math as pure functions, critic-free estimators, the rollout, the reward, PPO's
roles, config, diagnostics and checkpoints, the invariants `train.py check` measures."""
