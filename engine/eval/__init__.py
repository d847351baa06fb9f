"""Judging answers: bootstrap statistics, the report, scoring answers, evaluation during PPO."""
