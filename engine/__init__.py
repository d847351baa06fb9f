"""The RLHF engine: StackLLaMA's three stages (SFT, reward model, PPO) in plain PyTorch.

Read in this order (each file holds one idea; none is over 300 lines):

| # | file | what it holds |
| - | --- | --- |
| 1 | config.py | ModelConfig and its presets (tiny ... llama-7b), from/to HF config.json |
| 2 | model.py | the LLaMA network: RMSNorm, rotary, attention with a KV cache, MLP, heads |
| 3 | lora.py | LoRALinear with named adapters; apply, switch (use_adapter, disable_lora), merge |
| 4 | rlhf_math.py | the RM and PPO math as pure functions: pairwise loss, KL estimators, GAE, PPO losses |
| 5 | generate.py | batched sampling with a KV cache; each token's log-prob under the sampler |
| 6 | sft.py | stage 1: supervised fine-tuning on packed text (loop of nanoGPT's shape) |
| 7 | rm.py | stage 2: the reward model on answer pairs |
| 8 | ppo.py | stage 3: one PPO step as a numbered story, 1. rollout ... 6. log |
| 9 | rollout.py | PPO steps 1-2: the Rollout, the forward the update differentiates, scoring |
| 10 | ppo_roles.py | who is policy, reference, reward and value, and what each costs |
| 11 | ppo_config.py | every PPO flag with StackLLaMA's defaults |
| 12 | ppo_diagnostics.py | reward/length/negative-KL and on-policy statistics, repetition, warnings |
| 13 | estimators.py | critic-free advantages on the same loop: RLOO, GRPO, Dr. GRPO, REINFORCE++, ReMax |
| 14 | evaluate.py | `train.py eval`: models answer held-out questions, reward-model judges score them (answer_scores.py: KL and RM scores of answers) |
| 15 | eval_stats.py | bootstrap intervals over questions, win rates, length-controlled win rates |
| 16 | roofline.py | this machine's measured peaks, model FLOPs and bytes per phase, the step report and MFU |

Around them: stage_config.py (fields the training stages share), flags.py (configs -> command-line
flags), builder.py (the tokenizer and network a stage starts from), precision.py (dtypes, autocast),
int8.py (8-bit frozen linears; kernels in kernels/), dist.py (torchrun as explicit values, named
all-reduces), optim.py (fused AdamW, schedules, the non-finite step guard), logging.py (TensorBoard,
metrics.jsonl, one stdout line), train_state.py (resume), checkpoint.py (HF model folders),
checkpoint_import.py (Meta and llama2.c formats), adapter_files.py (PEFT adapter folders),
atomic.py (atomic writes), merge.py, generate_text.py and demo.py (the other train.py stages),
invariants.py and check.py (`train.py check`: what PPO assumes, measured on your checkpoint and device),
ppo_checkpoint.py (what a PPO checkpoint holds), ppo_eval.py (evaluation during PPO), eval_report.py
(eval's tables, report.md and frontier plot).
"""
