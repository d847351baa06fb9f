"""Install the RLHF engine as one import name of its own, `rlhf_engine`, plus the train.py entry script.

engine/, kernels/ and data/ stay at the top of the repository (the project's design) and install as
`rlhf_engine.engine`, `rlhf_engine.kernels` and `rlhf_engine.data`: a generic top-level name such as
`kernels` (Hugging Face's package, which transformers requires) or `data` would overwrite or shadow another
distribution's files. kernels/ has no __init__.py for the same reason (train.py's `use_checkout` says why).

torch is pinned exactly: on a CPU machine `pip install torch==2.13.0` takes the local CPU wheel; a
GPU user installs the matching CUDA build of the same version first, and pip then keeps it.
"""
from setuptools import find_packages, setup

SUBPACKAGES = ("engine", "kernels", "data")

setup(
    name="rlhf-engine",
    version="0.1.0",
    description="StackLLaMA-style RLHF (SFT, reward model, PPO) written in raw PyTorch",
    python_requires=">=3.10",
    packages=[f"rlhf_engine.{name}{sub}" for name in SUBPACKAGES
              for sub in ["", *(f".{p}" for p in find_packages(name))]],
    package_dir={f"rlhf_engine.{name}": name for name in SUBPACKAGES},
    scripts=["train.py"],
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4",
        "pyarrow>=14",
        "tensorboard>=2.14",
        "bitsandbytes>=0.43",
        "markdownify>=0.11",
        "tokenizers>=0.20",  # byte-level BPE (SmolLM2's vocabulary), the same code transformers runs
        "gguf>=0.10",  # llama.cpp's own GGUF reader and dequantiser
        "matplotlib>=3.7",  # train.py eval's frontier plot
    ],
    extras_require={
        # transformers and peft are oracles for tests only; never imported by engine/, kernels/, data/.
        "test": ["pytest>=7.4", "hypothesis>=6.80", "transformers>=4.45", "peft>=0.12"],
    },
)
