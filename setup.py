"""Install the RLHF engine: the packages engine, kernels and data plus the train.py entry script.

torch is pinned exactly: on a CPU machine `pip install torch==2.13.0` takes the local CPU wheel; a
GPU user installs the matching CUDA build of the same version first, and pip then keeps it.
"""
from setuptools import setup

setup(
    name="rlhf-engine",
    version="0.1.0",
    description="StackLLaMA-style RLHF (SFT, reward model, PPO) written in raw PyTorch",
    python_requires=">=3.10",
    packages=["engine", "kernels", "data"],
    py_modules=["train"],
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
        "matplotlib>=3.7",  # train.py eval's frontier plot
    ],
    extras_require={
        # transformers and peft are oracles for tests only; never imported by engine/, kernels/, data/.
        "test": ["pytest>=7.4", "hypothesis>=6.80", "transformers>=4.45", "peft>=0.12"],
    },
)
