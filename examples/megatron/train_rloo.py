"""RLOO with megatron-core training and vLLM sampling: no value model, leave-one-out baselines.

    python examples/megatron/train_rloo.py -c examples/megatron/configs/tiny/rloo.yaml

Supports: RLOOEngine (vLLM policy sampling ``n >= 2`` responses per prompt, Megatron
reference, rule and/or model reward, Megatron RLOO trainer; RLOOConfig keys in the
trainer's YAML), TP/PP/DP, LoRA, evaluation, checkpoints and resume, as train_rlhf.py.
``runtime.stream_data_loader_type`` must be ``dynamic``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chatlearn import RLOOEngine, RLOOTrainer  # noqa: E402
from train_grpo import main as run_critic_free  # noqa: E402


def main() -> list[dict]:
    return run_critic_free(RLOOEngine, RLOOTrainer)


if __name__ == "__main__":
    main()
