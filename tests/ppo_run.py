"""Run a short PPO job with the scripted reward (used by test_ppo.py, also under torchrun).

    python tests/ppo_run.py BASE DATA OUT BATCH MINI EPOCHS STEPS
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.dist import close_dist, init_dist  # noqa: E402
from engine.ppo import PPOConfig, train  # noqa: E402


def reward_multiple_of_4(tokens, mask):
    """Share of the last two (response) tokens whose id is a multiple of 4: about 1/4 at random."""
    resp, m = tokens[:, -2:], mask[:, -2:].float()
    return ((resp % 4 == 0).float() * m).sum(1) / m.sum(1).clamp(min=1)


def config(base, data, out, batch, mini, epochs, steps, **kw):
    return PPOConfig(**{**dict(model=base, data=data, out=out, batch_size=batch, mini_batch_size=mini,
                               ppo_epochs=epochs, max_steps=steps, response_min_length=2, response_max_length=2,
                               lr=5e-3, lora_r=8, lora_targets=("all-linear",), lora_dropout=0.0, kl_coef=0.05,
                               adaptive_kl=False, save_every=0, sample_every=0, log_every=1), **kw})


if __name__ == "__main__":
    base, data, out, batch, mini, epochs, steps = sys.argv[1:8]
    dist = init_dist("cpu")
    train(config(base, data, out, int(batch), int(mini), int(epochs), int(steps)), dist,
          reward_fn=reward_multiple_of_4)
    close_dist(dist)
