"""The RLHF part: the math as pure functions, critic-free estimators, the rollout, PPO's roles, config, diagnostics and checkpoints, invariants."""
