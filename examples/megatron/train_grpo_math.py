"""GRPO with a rule-based math reward next to a reward model, as ChatLearn 1.x's GRPO math example.

    python examples/megatron/train_grpo_math.py -c <1.x's examples/megatron/configs/llama2/grpo_math_vllm.yaml>

The config's five models, with our roles:

    policy       PolicyInference (vLLM): num_inference_per_prompt responses to each prompt
    reference    PolicyReference (Megatron): ref_logprobs
    reward       RewardInference (Megatron reward model from `load`): scores
    math_reward  MathReward (a rule, on CPU processes): the response's last number against the
                 record's `answer`, combined with the reward model's score by math_reward_strategy
                 (merge: their sum, as 1.x; sparse_only; dense_only)
    ppo_policy   GRPOTrainer (Megatron): clipped surrogate on group-normalised advantages + KL

    environment: policy -> reference -> reward -> math_reward
    driver:      group-normalised advantages (GRPORollouts: the responses to one prompt form a group)
    trainer:     ppo_policy.train_step
    sync:        ppo_policy -> policy

As in 1.x, ``runtime.sample_per_episode`` counts responses: an episode samples
``num_inference_per_prompt`` responses to each of sample_per_episode / num_inference_per_prompt
prompts (``apply_driver_keys``). Data: JSON lines with the prompt (``prompt_key``, default
``prompt``) and an ``answer``.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chatlearn  # noqa: E402
from chatlearn import (Engine, Environment, Evaluator, GRPOTrainer, MathReward, PolicyInference,  # noqa: E402
                       PolicyReference, RewardInference, Trainer)
from chatlearn.algorithms.core import config_from_args  # noqa: E402
from chatlearn.algorithms.grpo import GRPOConfig, GRPORollouts  # noqa: E402
from chatlearn.data.prompts import read_jsonl  # noqa: E402
from chatlearn.models.chatlearn1x_args import apply_driver_keys  # noqa: E402
from chatlearn.runtime.rl_engines import old_logprobs_stage  # noqa: E402
from train_rlhf import reward_metrics  # noqa: E402


def build_engine(policy, reference, reward, math_reward, ppo_policy, eval_path: str | None = None) -> Engine:
    args = chatlearn.get_args()
    trainer_args = args.models[ppo_policy.name].args_dict
    recompute = old_logprobs_stage(ppo_policy, policy)  # recompute_old_logprobs, unless the step is on-policy

    def env_flow(batch):
        policy_out = policy.forward_step(batch)
        if recompute:  # old_logprobs from the trainer, the sampler's kept as behaviour_logprobs
            policy_out = ppo_policy.forward_step(policy_out)
        ref_out = reference.forward_step(policy_out)
        reward_out = reward.forward_step(policy_out, ref_out)
        return math_reward.forward_step(reward_out)

    def trainer_flow(batch):
        ppo_policy.train_step(batch)

    evaluator = None
    if eval_path and args.runtime.eval_episode_interval > 0:
        def eval_flow(batch):
            return math_reward.eval_forward(reward.eval_forward(policy.eval_forward(batch)))

        evaluator = Evaluator(eval_flow).set_dataset(read_jsonl(eval_path)).set_post_process_func(reward_metrics)
    group = int(args.models[policy.name].args_dict.get("n", 1))
    processor = GRPORollouts(config_from_args(GRPOConfig, trainer_args), group)
    engine = Engine(Environment(env_flow), Trainer(trainer_flow), evaluator, rollout_processor=processor)
    engine.set_parameter_sync(ppo_policy, policy)
    return engine


def main() -> list[dict]:
    chatlearn.init()
    args = chatlearn.get_args()
    apply_driver_keys(args, sampler="policy")  # num_inference_per_prompt, cliprange, ... (ChatLearn 1.x keys)
    engine = build_engine(PolicyInference("policy"), PolicyReference("reference"), RewardInference("reward"),
                          MathReward("math_reward"), GRPOTrainer("ppo_policy"), args.runtime.eval_data_path)
    engine.set_dataset(read_jsonl(args.runtime.data_path))
    return engine.learn()


if __name__ == "__main__":
    main()
