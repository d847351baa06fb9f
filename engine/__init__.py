"""The RLHF engine: StackLLaMA's three stages (SFT, reward model, PPO) in plain PyTorch, and DPO beside them.

The files at this level are the commands, one per `train.py` stage: sft.py, rm.py, ppo.py (one PPO
step as a numbered story, 1. rollout ... 6. log), dpo.py, evaluate.py (`eval`), check.py, merge.py,
generate_text.py (`generate`), demo.py, and flags.py (configs -> command-line flags). The parts sit
in five drawers, read in this order; a drawer imports only from the drawers above it, never a command:

- model/: the network and what runs inside it: config presets, llama.py, LoRA, 8-bit linears, dtypes,
  sampling.
- weights/: weights on disk: Hugging Face folders, GGUF and other foreign formats, load.py (which picks the
  format), PEFT adapters, atomic writes, the builder a stage starts from and load_model, the one loader of a
  checkpoint plus adapter.
- training/: what every training stage shares: torchrun as values, the optimiser, logging, resume, shared
  flags, the roofline, and the pair stages' data (rm, dpo).
- rl/: the RLHF part: rlhf_math.py (pure functions), estimators, the rollout (PPO's steps 1-2), the update
  (step 5), the reward, PPO's roles, config, diagnostics and checkpoints, the invariants `check` measures.
- eval/: judging answers: the held-out questions, bootstrap statistics, the report, scoring answers,
  evaluation during PPO.
"""
