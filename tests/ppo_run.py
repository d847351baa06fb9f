"""Run a short PPO job with the scripted reward (used by test_ppo.py, also under torchrun).

    python tests/ppo_run.py BASE DATA OUT BATCH MINI EPOCHS STEPS [FIELD=VALUE ...]

FIELD=VALUE sets a further PPOConfig field (an int if VALUE is one, else the string).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as _this_checkout  # noqa: E402,F401  train.py binds rlhf_engine to its own folder

from rlhf_engine.engine.training.dist import close_dist, init_dist  # noqa: E402
from rlhf_engine.engine.model.lora import LoRAConfig  # noqa: E402
from rlhf_engine.engine.ppo import PPOConfig, train  # noqa: E402


def reward_multiple_of_4(tokens, mask):
    """Share of the last two (response) tokens whose id is a multiple of 4: about 1/4 at random."""
    resp, m = tokens[:, -2:], mask[:, -2:].float()
    return ((resp % 4 == 0).float() * m).sum(1) / m.sum(1).clamp(min=1)


def config(base, data, out, *, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_steps=1, **kw):
    """A tiny PPO run's config: 2-token responses, LoRA r=8 on every linear, a fixed small β."""
    return PPOConfig(**{**dict(model=base, data=data, out=out, batch_size=batch_size, mini_batch_size=mini_batch_size,
                               ppo_epochs=ppo_epochs, max_steps=max_steps, response_min_length=2, response_max_length=2,
                               lr=5e-3, lora=LoRAConfig(r=8, targets=("all-linear",), dropout=0.0), kl_coef=0.05,
                               adaptive_kl=False, save_every=0, sample_every=0, log_every=1), **kw})


if __name__ == "__main__":
    base, data, out, batch, mini, epochs, steps = sys.argv[1:8]
    extra = dict(arg.split("=", 1) for arg in sys.argv[8:])
    extra = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in extra.items()}
    dist = init_dist("cpu")
    train(config(base, data, out, batch_size=int(batch), mini_batch_size=int(mini), ppo_epochs=int(epochs),
                 max_steps=int(steps), **extra), dist, reward_fn=reward_multiple_of_4)
    close_dist(dist)
