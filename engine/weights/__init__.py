"""Weights on disk: Hugging Face folders, GGUF and other foreign formats, load.py (which picks the format),
PEFT adapters, atomic writes, and the builder a stage starts from."""
