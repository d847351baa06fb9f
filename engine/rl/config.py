"""PPOConfig: every flag `train.py ppo` honours, with StackLLaMA's defaults (rl_training.py): lr 1.4e-5,
4 PPO epochs, init KL coef 0.2 adaptive to target 6 over horizon 10000, response length 32–128, LoRA
r=16 α=32 dropout 0.05, γ=1, λ=0.95, clip 0.2, value clip 0.2, vf_coef 0.1, reward baseline 0.
The shared fields (model, out, optimiser, LoRA, precision, resume) come from engine/training/stage_config.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_engine.engine.rl.estimators import CRITIC_FREE, ESTIMATORS
from rlhf_engine.engine.training.stage_config import StageConfig, require_positive


@dataclass(frozen=True)
class PPOConfig(StageConfig):
    estimator: str = field(default="ppo", metadata={
        "help": "advantage estimator: ppo (GAE with a learned critic) or a critic-free one (engine/rl/estimators.py)",
        "choices": list(ESTIMATORS)})
    samples_per_prompt: int = field(default=1, metadata={"help": "responses sampled per query (a group); rloo, "
                                                                 "grpo and dr_grpo need >= 2"})
    reward_model: tuple[str, ...] = field(default=None, metadata={
        "help": "reward model: a merged RM folder (its own network), or an RM adapter folder (a train.py rm "
                "checkpoint) put on the policy's frozen base; several adapter folders make an ensemble"})
    reward_ensemble: str = field(default="mean", metadata={
        "help": "how an ensemble's members combine: mean, min, or uwo (mean - λ x variance across members, "
                "Coste et al. 2024)", "choices": ["mean", "min", "uwo"]})
    uwo_lambda: float = field(default=1.0, metadata={"help": "λ of --reward-ensemble uwo"})
    value_model: str = field(default="head", metadata={"help": "value function: a head on the policy's hidden states "
                                                                "(StackLLaMA), or a value adapter + head initialised "
                                                                "from the reward model",
                                                        "choices": ["head", "reward"]})
    data: str = field(default=None, metadata={"help": "pairs data whose questions are the prompts (the rl split)"})
    max_steps: int = field(default=100, metadata={"help": "PPO steps (rollout + update)"})
    batch_size: int = field(default=16, metadata={"help": "queries per rank per PPO step"})
    mini_batch_size: int = field(default=4, metadata={"help": "responses per rank per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per minibatch (gradient accumulation)"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    max_prompt_length: int = field(default=512, metadata={"help": "keep queries shorter than this (tokens)"})
    response_min_length: int = field(default=32, metadata={"help": "response length cap drawn per batch from "
                                                                   "[min, max]"})
    response_max_length: int = field(default=128, metadata={"help": "(see response-min-length)"})
    # No top-k / top-p: the update and the KL score the policy's full distribution at this temperature, so
    # sampling from a truncated one would make the ratio and the KL describe another policy (docs/ON_POLICY.md).
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature, applied alike when the "
                                                                "update and the KL score the samples"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL in the reward (grpo and dr_grpo put "
                                                              "k3 in the loss instead)",
                                                      "choices": ["k1", "k2", "k3", "full"]})
    kl_coef: float = field(default=0.2, metadata={"help": "initial KL coefficient β"})
    adaptive_kl: bool = field(default=True, metadata={"help": "adapt β towards --kl-target (else fixed)"})
    kl_target: float = field(default=6.0, metadata={"help": "target KL per response (adaptive controller)"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "adaptive controller horizon"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss coefficient"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus coefficient"})
    whiten: str = field(default="batch", metadata={"help": "whiten advantages over the whole batch across ranks, "
                                                           "or per minibatch (blog-era TRL)",
                                                   "choices": ["batch", "minibatch"]})
    reward_baseline: float = field(default=0.0, metadata={"help": "subtracted from every RM score"})
    reward_norm: bool = field(default=False, metadata={"help": "normalise scores by running mean/std"})
    reward_clip: float = field(default=0.0, metadata={"help": "clip shaped scores to ±this (0 = off)"})
    no_eos_penalty: float | None = field(default=None, metadata={"help": "reward for responses cut at the length "
                                                                         "cap (default: keep their RM score)"})
    early_stop_kl: float = field(default=0.0, metadata={"help": "stop this step's PPO epochs when a minibatch's "
                                                                "approx KL to the rollout policy exceeds this "
                                                                "(0 = off; not the controller's --kl-target)"})
    ratio_threshold: float = field(default=10.0, metadata={"help": "skip a minibatch whose mean ratio exceeds "
                                                                   "this"})
    onpolicy_warn_every: int = field(default=50, metadata={"help": "repeat the sampler-vs-trainer disagreement "
                                                                      "warning every N steps while it lasts"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the policy's forward that the rollout's "
                          "scoring and the update share (decode stays eager: compiled, it measured 2.6x slower "
                          "on CPU; docs/BENCHMARKS.md)"})
    deterministic: bool = field(default=False, metadata={"help": "deterministic torch algorithms (and cuBLAS "
                                                                 "workspace): two runs give identical metrics"})
    eval_every: int = field(default=0, metadata={"help": "every N steps and at the end, the policy and the "
                                                          "reference answer --eval-prompts held-out questions "
                                                          "(0 = off; see engine/eval/ppo_eval.py)"})
    eval_data: str | None = field(default=None, metadata={"help": "pairs whose questions --eval-every asks (the "
                                                                   "evaluation split)"})
    eval_prompts: int = field(default=64, metadata={"help": "questions per evaluation"})
    judge: str | None = field(default=None, metadata={"help": "a held-out reward model (not the one PPO "
                                                              "optimises) for --eval-every's judge score and win "
                                                              "rate"})
    sample_every: int = field(default=10, metadata={"help": "log a table of samples every N steps"})
    lr: float = field(default=1.4e-5, metadata={"help": "learning rate"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    log_every: int = field(default=1, metadata={"help": "log every N steps"})

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("--data is required")
        if isinstance(self.reward_model, str):  # one path, as Python callers pass it
            object.__setattr__(self, "reward_model", (self.reward_model,))
        if self.reward_model and len(self.reward_model) > 1 and self.value_model == "reward":
            raise ValueError("--value-model reward starts the critic from one reward model; an ensemble of "
                             f"{len(self.reward_model)} has no single one to start from: use --value-model head")
        if self.uwo_lambda < 0:
            raise ValueError(f"--uwo-lambda must be >= 0 (it weighs the members' disagreement), got {self.uwo_lambda}")
        require_positive(self, "max_steps", "batch_size", "mini_batch_size", "grad_accum", "ppo_epochs",
                         "max_prompt_length", "response_min_length", "samples_per_prompt")
        if self.batch_size * self.samples_per_prompt % self.mini_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} x --samples-per-prompt {self.samples_per_prompt} "
                             f"responses must be a multiple of --mini-batch-size {self.mini_batch_size}")
        if self.estimator in ("rloo", "grpo", "dr_grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"--estimator {self.estimator} compares the responses to one prompt: it needs "
                             f"--samples-per-prompt >= 2, got {self.samples_per_prompt}")
        if self.estimator in CRITIC_FREE and self.value_model != "head":
            raise ValueError(f"--estimator {self.estimator} trains no value function: --value-model "
                             f"{self.value_model} does not apply")
        if self.mini_batch_size % self.grad_accum:
            raise ValueError(f"--mini-batch-size {self.mini_batch_size} must be a multiple of --grad-accum "
                             f"{self.grad_accum}")
        if self.response_max_length < self.response_min_length:
            raise ValueError("--response-max-length must be >= --response-min-length")
        if self.eval_every and not self.eval_data:
            raise ValueError("--eval-every needs --eval-data (the evaluation split)")
        if self.eval_every < 0 or self.eval_prompts < 1:
            raise ValueError(f"--eval-every must be >= 0 and --eval-prompts >= 1, got {self.eval_every} and "
                             f"{self.eval_prompts}")
        if self.kl_coef < 0:
            raise ValueError(f"--kl-coef must be >= 0 (it weighs a penalty), got {self.kl_coef}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 for PPO sampling, got {self.temperature}")
