"""GRPO with megatron-core training and vLLM sampling: no value model, group-normalised rewards.

    python examples/megatron/train_grpo.py -c examples/megatron/configs/tiny/grpo.yaml

Supports: GRPOEngine (vLLM policy sampling ``n`` responses per prompt,
Megatron reference, rule and/or model reward, Megatron GRPO trainer),
``select_top_k`` (keep the best responses of each group) (GRPOConfig keys in the
trainer's YAML), TP/PP/DP, LoRA, evaluation, checkpoints and resume, as
train_rlhf.py. ``runtime.stream_data_loader_type`` must be ``dynamic``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chatlearn  # noqa: E402
from chatlearn import GRPOEngine, GRPOTrainer, PolicyInference, PolicyReference, RewardInference  # noqa: E402
from chatlearn.data.prompts import read_jsonl  # noqa: E402
from chatlearn.models.chatlearn1x_args import apply_driver_keys  # noqa: E402
from train_rlhf import build_evaluator  # noqa: E402


def main(engine_cls=GRPOEngine, trainer_cls=GRPOTrainer) -> list[dict]:
    """Also the online-DPO, RLOO and REINFORCE++ recipes (train_online_dpo.py, train_rloo.py,
    train_reinforce_pp.py): the same four roles, another engine and trainer."""
    chatlearn.init()
    args = chatlearn.get_args()
    apply_driver_keys(args, sampler="policy")  # ChatLearn 1.x example keys (num_inference_per_prompt, ...)
    policy = PolicyInference("policy")
    reference = PolicyReference("reference")
    reward = RewardInference("reward")
    trainer = trainer_cls("policy_trainer")  # the YAML key under models:

    evaluator = build_evaluator(policy, reward, args.runtime.eval_data_path)
    engine = engine_cls(policy, reference, reward, trainer, evaluator=evaluator)
    engine.set_dataset(read_jsonl(args.runtime.data_path))
    return engine.learn()


if __name__ == "__main__":
    main()
