"""Judging answers: the held-out questions, bootstrap statistics, the report, scoring answers, evaluation
during PPO."""
