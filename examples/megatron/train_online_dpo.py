"""Online DPO with megatron-core training and vLLM sampling: on-policy pairs ranked by the reward.

    python examples/megatron/train_online_dpo.py -c examples/megatron/configs/tiny/online_dpo.yaml

Supports: OnlineDPOEngine (vLLM policy with ``n: 2``, Megatron reference,
rule and/or model reward, Megatron DPO trainer with ``beta``), TP/PP/DP,
LoRA, evaluation, checkpoints and resume, as train_rlhf.py.
``runtime.stream_data_loader_type`` must be ``dynamic``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chatlearn import DPOTrainer, OnlineDPOEngine  # noqa: E402
from train_grpo import main as run_critic_free  # noqa: E402


def main() -> list[dict]:
    return run_critic_free(OnlineDPOEngine, DPOTrainer)


if __name__ == "__main__":
    main()
