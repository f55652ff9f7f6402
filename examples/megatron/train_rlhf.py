"""PPO RLHF with megatron-core training and vLLM sampling, as in ChatLearn 1.x.

    python examples/megatron/train_rlhf.py -c examples/megatron/configs/tiny/rlhf.yaml
    bash examples/megatron/scripts/run_qwen2_7b.sh    (8 GPUs: configs/gpu/rlhf_7b.yaml)

Supports: the six roles of RLHFEngine (vLLM policy, Megatron reference,
reward model and/or Python reward, value, PPO policy and value trainers),
TP/PP/DP per model, colocation, LoRA (``lora:`` in the YAML), parameter sync
every ``sync_frequency`` episodes, evaluation on ``runtime.eval_data_path``
every ``eval_episode_interval`` episodes (and once before training),
checkpoints every ``save_episode_interval`` episodes and resume.

Data: ``runtime.data_path`` (and ``eval_data_path``) are JSON lines with a
``prompt``; other keys (an ``answer``, say) reach the reward function.

ChatLearn 1.x configs run as they are (``-c examples/megatron/configs/llama2/vllm_rlhf.yaml``
of 1.x, with its run script's environment and ``load`` paths pointing at Hugging Face
checkpoints): the model files' Megatron-LM, vLLM and example keys are used, checked
against the checkpoints or warned about (docs/migration_config.md, "Model files").
"""
from __future__ import annotations

import chatlearn
from chatlearn import (Evaluator, PolicyInference, PolicyReference, PolicyTrainer, RewardInference, RLHFEngine,
                       ValueInference, ValueTrainer)
from chatlearn.data.prompts import read_jsonl
from chatlearn.models.chatlearn1x_args import apply_driver_keys


def reward_metrics(results: list[dict], episode: int) -> dict[str, float]:
    """Evaluation metrics from the reward stage's outputs: the mean score and each source's."""
    metrics = {"reward/mean": sum(float(r["scores"]) for r in results) / len(results)}
    for key, name in (("model_scores", "reward/model"), ("fn_scores", "reward/fn")):
        if key in results[0]:
            metrics[name] = sum(float(r[key]) for r in results) / len(results)
    metrics["response_length/mean"] = sum(int(r["response_len"]) for r in results) / len(results)
    return metrics


def build_evaluator(policy: PolicyInference, reward: RewardInference, path: str | None) -> Evaluator | None:
    """Responses to the eval prompts (``eval_*`` sampling keys), scored by the reward; None without
    eval data or with ``runtime.eval_episode_interval`` 0 (the file is then not read)."""
    if not path or chatlearn.get_args().runtime.eval_episode_interval <= 0:
        return None

    def eval_flow(batch):
        return reward.eval_forward(policy.eval_forward(batch))

    return Evaluator(eval_flow).set_dataset(read_jsonl(path)).set_post_process_func(reward_metrics)


def main() -> list[dict]:
    chatlearn.init()
    args = chatlearn.get_args()
    apply_driver_keys(args, sampler="policy")  # ChatLearn 1.x example keys (cliprange_value, ...)
    policy = PolicyInference("policy")
    reference = PolicyReference("reference")
    reward = RewardInference("reward")
    value = ValueInference("value")
    ppo_policy = PolicyTrainer("ppo_policy")
    ppo_value = ValueTrainer("ppo_value")

    evaluator = build_evaluator(policy, reward, args.runtime.eval_data_path)
    engine = RLHFEngine(policy, reference, reward, value, ppo_policy, ppo_value, evaluator=evaluator)
    engine.set_dataset(read_jsonl(args.runtime.data_path))
    return engine.learn()


if __name__ == "__main__":
    main()
