"""A ChatLearn 1.x entry script, as 1.x's examples/megatron/entry/train_rlhf.py is written
(its own toy models in toy1x_models.py). tests/test_chatlearn1x_script.py runs it unchanged:

    python tests/chatlearn1x_script/train_rlhf.py -c tests/chatlearn1x_script/configs/rlhf.yaml
"""
import random

from toy1x_models import (EvaluatorPostProcess, PolicyInference, PolicyReference, PolicyTrainer, RewardInference,
                          ValueInference, ValueTrainer, get_prompts)

import chatlearn
from chatlearn import RLHFEngine

if __name__ == "__main__":
    chatlearn.init()
    args = chatlearn.get_args()
    reference_model = PolicyReference("reference")
    policy_trainer = PolicyTrainer("ppo_policy")

    policy_model = PolicyInference("policy")
    reward_model = RewardInference("reward")

    value_model = ValueInference("value")
    value_trainer = ValueTrainer("ppo_value")
    engine = RLHFEngine(policy_model, reference_model, reward_model, value_model, policy_trainer, value_trainer)

    all_prompts = get_prompts(args.runtime_args.data_path, num_limit=args.runtime_args.get('training_data_num_limit'))
    random.seed(reference_model.model_args["seed"])
    split_ratio = 0.9 if args.runtime_args.eval_episode_interval > 0 else 1
    num_train = int(len(all_prompts) * split_ratio)
    random.shuffle(all_prompts)
    train_prompts = all_prompts[:num_train]

    if args.runtime_args.eval_episode_interval > 0:
        val_prompts = all_prompts[num_train:]
        eval_num_limit = args.runtime_args.get('eval_data_num_limit')

        def eval_flow(batch):
            r0 = policy_model.eval_forward(batch)
            r1 = reward_model.eval_forward(r0)
            return r1
        if eval_num_limit:
            eval_num_limit = min(eval_num_limit, len(val_prompts))
            val_prompts = val_prompts[:eval_num_limit]
        evaluator = EvaluatorPostProcess(eval_flow) \
            .set_dataset(val_prompts)
        engine.set_evaluator(evaluator)
    engine.set_dataset(train_prompts)
    engine.learn()
