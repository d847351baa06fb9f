"""The network and what runs inside it: config presets, the LLaMA model, LoRA, 8-bit linears, dtypes,
sampling."""
