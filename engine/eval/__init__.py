"""Judging answers: the held-out questions, bootstrap statistics, the report, scoring answers, evaluation
during PPO, and a pair stage's held-out accuracy beside the length rule."""
