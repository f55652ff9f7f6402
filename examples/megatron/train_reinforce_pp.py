"""REINFORCE++ with megatron-core training and vLLM sampling: no value model, the KL in the token
rewards, returns whitened over each training batch.

    python examples/megatron/train_reinforce_pp.py -c examples/megatron/configs/tiny/reinforce_pp.yaml

Supports: ReinforcePPEngine (vLLM policy sampling ``n >= 1`` responses per prompt,
Megatron reference, rule and/or model reward, Megatron REINFORCE++ trainer;
ReinforcePPConfig keys in the trainer's YAML), TP/PP/DP, LoRA, evaluation, checkpoints
and resume, as train_rlhf.py. With ``n`` > 1, ``runtime.stream_data_loader_type`` must be
``dynamic``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chatlearn import ReinforcePPEngine, ReinforcePPTrainer  # noqa: E402
from train_grpo import main as run_critic_free  # noqa: E402


def main() -> list[dict]:
    return run_critic_free(ReinforcePPEngine, ReinforcePPTrainer)


if __name__ == "__main__":
    main()
