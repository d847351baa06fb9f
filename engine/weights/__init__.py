"""Weights on disk: Hugging Face folders, foreign formats, PEFT adapters, atomic writes, and the builder a stage starts from."""
